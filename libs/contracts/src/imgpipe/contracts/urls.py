"""The rules an image or webhook URL must meet before anything is stored: the same
for URLs in a CSV, a webhook URL given at upload and a webhook subscription, and
ending with the outbound guard's own static check (outbound.check_url), so that a URL
accepted here is one a download or a delivery will at least try."""

from __future__ import annotations

import functools
import re
import unicodedata
from urllib.parse import urlsplit

from imgpipe.contracts.outbound import URLRefused, check_url

MAX_URL_LENGTH = 2048

_BAD_URL_CHARS = re.compile(r"[\s\x00-\x1f\x7f]")
# A second scheme inside a URL means two URLs with the comma between them missing; not
# after '=' (a query parameter holding a URL) nor '/' (web.archive.org/web/2020/https://...).
_GLUED_URL = re.compile(r"(?<=[^=/])https?://", re.IGNORECASE)


def url_problem(url: str, allow_private: bool = False) -> str | None:
    """Why `url` is not an acceptable http(s) URL, or None when it is.

    Ends with the outbound guard's own static check, so an address the processor or
    notifier would refuse (loopback, private, metadata...) is refused here with its line."""
    if len(url) > MAX_URL_LENGTH:
        return f"URL is longer than {MAX_URL_LENGTH} characters"
    if _BAD_URL_CHARS.search(url):
        return f"URL contains spaces or control characters: {url!r}"
    if invisible := _invisible_char(url):
        return f"URL contains an invisible character (U+{ord(invisible):04X}): {url!r}"
    if _GLUED_URL.search(url):
        return f"two URLs run together, with no comma between them: {url!r}"
    try:
        url.encode()  # a lone surrogate can be neither sent nor stored
        parts = urlsplit(url)
        port = parts.port  # raises ValueError on a bad port
    except ValueError:  # UnicodeError included
        return f"not a valid URL: {url!r}"
    if parts.scheme.lower() not in ("http", "https"):
        return f"URL must start with http:// or https://: {url!r}"
    if "@" in parts.netloc:
        return f"URL must not contain credentials: {_redacted(url)!r}"
    if not parts.hostname:
        return f"URL has no host: {url!r}"
    if port == 0:
        return f"URL has port 0, which nothing can be fetched from: {url!r}"
    if refusal := _origin_refusal(f"{parts.scheme}://{parts.netloc}/", allow_private):
        return f"{refusal}: {url!r}"
    return None


@functools.lru_cache(maxsize=1024)
def _origin_refusal(origin: str, allow_private: bool) -> str | None:
    """The outbound guard's verdict on a scheme and host (all it judges; the path was
    checked above), once per origin: a CSV's URLs share a few hosts, and the full check
    cost ~80 µs a URL, most of a 30,000-URL upload's time."""
    try:
        check_url(origin, allow_private)
    except URLRefused as refused:
        return f"URL refused: {refused.reason}"
    except ValueError:
        return "not a valid URL"
    return None


def _invisible_char(text: str) -> str | None:
    """The first Unicode format character (zero-width space, bidi mark, soft hyphen...)."""
    if text.isascii():  # the usual case, and ASCII has none
        return None
    return next((char for char in text if unicodedata.category(char) == "Cf"), None)


def _redacted(url: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rpartition('@')[2]}"
