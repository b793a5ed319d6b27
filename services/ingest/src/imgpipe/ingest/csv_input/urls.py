"""How an `Input Image Urls` cell lists its URLs; what makes one acceptable is
imgpipe.contracts.urls."""

from __future__ import annotations

import re
from collections.abc import Iterator

_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*:", re.IGNORECASE)
_HTTP_URL = re.compile(r"https?://", re.IGNORECASE)
_LINE_BREAK = re.compile(r"\r\n?|\n")


def url_pieces(cell: str) -> Iterator[tuple[str, bool]]:
    """The URLs of an `Input Image Urls` cell, in order, blanks dropped, each with whether
    a comma ties it to an http(s) URL before it on its line (then a piece without a scheme
    is likely the rest of that URL).

    Commas separate URLs, and so do line breaks (Alt+Enter in an Excel cell): a line
    break can never be part of a URL."""
    for text_line in _LINE_BREAK.split(cell):
        after_url = False
        for piece in text_line.split(","):
            if url := piece.strip():
                yield url, after_url
                after_url = after_url or is_http_url(url)


def is_http_url(text: str) -> bool:
    """Whether `text` starts like an http(s) URL."""
    return bool(_HTTP_URL.match(text))


def has_scheme(text: str) -> bool:
    """Whether `text` starts with a URL scheme of any kind."""
    return bool(_SCHEME.match(text))
