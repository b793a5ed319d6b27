"""Streaming parser for the input CSV (DESIGN.md, "CSV input").

The upload is read in chunks, decoded incrementally and fed to `csv.reader` one
physical line at a time, so every problem can name the line its row starts on
(header = line 1). Problems are collected, not raised one by one: the client
gets the whole list in one answer. Hard limits (size, rows, images, listed
problems), binary content and a lost place in the CSV stop the parse early, so
the work done for any upload is bounded.
"""

from __future__ import annotations

import codecs
import csv
import functools
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO
from urllib.parse import urlsplit

from imgpipe.contracts.events import Row
from imgpipe.contracts.outbound import URLRefused, check_url
from imgpipe.ingest.domain import Problem

SERIAL = "S. No."
PRODUCT = "Product Name"
URLS = "Input Image Urls"
COLUMNS = (SERIAL, PRODUCT, URLS)

CHUNK_SIZE = 64 * 1024
MAX_URL_LENGTH = 2048
MAX_LISTED_PROBLEMS = 1000

_BAD_URL_CHARS = re.compile(r"[\s\x00-\x1f\x7f]")
# A second scheme inside a URL means two URLs with the comma between them missing; not
# after '=' (a query parameter holding a URL) nor '/' (web.archive.org/web/2020/https://...).
_GLUED_URL = re.compile(r"(?<=[^=/])https?://", re.IGNORECASE)
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*:", re.IGNORECASE)
_HTTP_URL = re.compile(r"https?://", re.IGNORECASE)
_LINE_BREAK = re.compile(r"\r\n?|\n")
# Tab, CR and LF are allowed: a quoted name may span lines.
_NAME_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")

# Python's csv error texts, in the words of someone holding the spreadsheet.
_CSV_ERRORS = {
    "new-line character seen in unquoted field": (
        "lines end with CR alone (old Mac format); save the file with CRLF or LF line endings"
    ),
    "unexpected end of data": "a quote opened on this line is never closed",
    "expected after '\"'": (
        'text right after a closing quote; quote the whole cell and write a quote inside it as ""'
    ),
}

_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
_ZIP_MAGIC = b"PK\x03\x04"


@dataclass(frozen=True)
class CsvLimits:
    max_bytes: int
    max_rows: int
    max_images: int
    allow_private_urls: bool = False  # IMGPIPE_ALLOW_PRIVATE_URLS: the guard's address rule
    # IMGPIPE_MAX_EVENT_BYTES: the request as a RequestReceived, checked once it is built
    max_event_bytes: int | None = None


@dataclass(frozen=True)
class ParsedCsv:
    rows: list[Row]
    image_count: int


@dataclass
class CsvRejected(Exception):
    """The CSV cannot be accepted; `too_large` marks a size limit (HTTP 413)."""

    problems: list[Problem]
    too_large: bool = False
    total: int = 0  # problems found, including any left off the list

    def __post_init__(self) -> None:
        self.total = max(self.total, len(self.problems))
        super().__init__(f"CSV has {self.total} problems")


class _Stop(Exception):
    """Parsing cannot go on (limit reached, binary data); carries the last problem."""

    def __init__(self, problem: Problem, too_large: bool) -> None:
        self.problem, self.too_large = problem, too_large


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


def split_urls(cell: str) -> list[str]:
    """The URLs of an `Input Image Urls` cell, in order, blanks dropped.

    Commas separate them, and so do line breaks (Alt+Enter in an Excel cell): a line
    break can never be part of a URL."""
    return [url for url, _ in _url_pieces(cell)]


def _url_pieces(cell: str) -> Iterator[tuple[str, bool]]:
    """Each URL of the cell, and whether a comma ties it to an http(s) URL before it on
    its line (then a piece without a scheme is likely the rest of that URL)."""
    for text_line in _LINE_BREAK.split(cell):
        after_url = False
        for piece in text_line.split(","):
            if url := piece.strip():
                yield url, after_url
                after_url = after_url or bool(_HTTP_URL.match(url))


def parse_csv(stream: BinaryIO, limits: CsvLimits) -> ParsedCsv:
    """Parse and validate the whole upload; raises CsvRejected naming every problem."""
    return _Parser(stream, limits).run()


class _Lines:
    """Physical lines of a UTF-8 byte stream; undecodable bytes are noted, not fatal."""

    def __init__(self, stream: BinaryIO, max_bytes: int, report: _Report) -> None:
        self._stream = stream
        self._max_bytes = max_bytes
        self._report = report
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._newlines = 0  # newlines decoded so far: locates bad bytes
        self.bytes_read = 0

    def __iter__(self) -> Iterator[str]:
        partial: list[str] = []  # the unfinished line, in pieces
        for text in self._texts():
            # Scan only the new text: a very long line then costs linear time.
            *ends, rest = text.split("\n")
            for end in ends:
                partial.append(end)
                yield "".join(partial) + "\n"
                partial.clear()
            partial.append(rest)
        if last := "".join(partial):
            yield last

    def _texts(self) -> Iterator[str]:
        """The decoded text, chunk by chunk, without a leading BOM (a quoted first header
        cell after a BOM would not parse as quoted)."""
        at_start = True
        for chunk in self._chunks():
            text = self._decode(chunk, final=False)
            if at_start and text:
                text, at_start = text.removeprefix("\ufeff"), False
            yield text
        yield self._decode(b"", final=True)

    def _chunks(self) -> Iterator[bytes]:
        while chunk := self._stream.read(CHUNK_SIZE):
            self.bytes_read += len(chunk)
            if self.bytes_read > self._max_bytes:
                raise _Stop(
                    Problem(f"file is larger than {self._max_bytes} bytes", field="file"),
                    too_large=True,
                )
            if self.bytes_read == len(chunk):
                _check_file_type(chunk)
            if b"\x00" in chunk:
                line = self._newlines + chunk[: chunk.index(b"\x00")].count(b"\n") + 1
                raise _Stop(Problem("not a CSV: the file holds binary data", line), False)
            yield chunk

    def _decode(self, data: bytes, final: bool) -> str:
        """Decode, replacing each undecodable sequence and reporting its line once."""
        out: list[str] = []
        buffered, _ = self._decoder.getstate()
        data = buffered + data
        self._decoder.reset()
        while True:
            try:
                text = self._decoder.decode(data, final)
            except UnicodeDecodeError as exc:
                good = data[: exc.start].decode("utf-8")
                self._newlines += good.count("\n")
                self._report.add(Problem("not UTF-8 text", self._newlines + 1))
                out.append(good + "\ufffd")
                data = data[exc.end :]
                self._decoder.reset()
                continue
            self._newlines += text.count("\n")
            out.append(text)
            return "".join(out)


def _check_file_type(start: bytes) -> None:
    """Name the usual wrong saves (Excel's "Unicode Text", a workbook) rather than
    calling them binary data."""
    if start.startswith(_UTF16_BOMS):
        raise _Stop(Problem("the file is UTF-16; save it as CSV UTF-8", 1), too_large=False)
    if start.startswith(_ZIP_MAGIC):
        message = "this is an Excel workbook (.xlsx); save it as CSV UTF-8"
        raise _Stop(Problem(message, 1), too_large=False)


@dataclass
class _Report:
    """Problems in the order found, one per (line, column, message), at most
    MAX_LISTED_PROBLEMS: one more stops the parse, so a broken file costs bounded work."""

    problems: list[Problem] = field(default_factory=list)
    total: int = 0
    _seen: set[tuple[int | None, str | None, str]] = field(default_factory=set)

    def add(self, problem: Problem) -> None:
        key = (problem.line, problem.column, problem.message)
        if key in self._seen:
            return
        if len(self.problems) >= MAX_LISTED_PROBLEMS:
            message = (
                "too many problems: reading stopped on this line; "
                f"the first {MAX_LISTED_PROBLEMS} are listed"
            )
            raise _Stop(Problem(message, problem.line), too_large=False)
        self._seen.add(key)
        self.total += 1
        self.problems.append(problem)


class _Parser:
    def __init__(self, stream: BinaryIO, limits: CsvLimits) -> None:
        self.limits = limits
        self.report = _Report()
        self.lines = _Lines(stream, limits.max_bytes, self.report)
        self.rows: list[Row] = []
        self.row_count = 0
        self.image_count = 0
        self.serials: dict[str, int] = {}
        self.header_width = 0  # cells up to the header's last named one

    def run(self) -> ParsedCsv:
        try:
            self._read()
        except _Stop as stop:
            raise self._rejected(stop) from None
        if self.report.total:
            raise self._rejected()
        return ParsedCsv(self.rows, self.image_count)

    def _rejected(self, stop: _Stop | None = None) -> CsvRejected:
        # Decoding runs a chunk ahead of the rows, so sort to list problems in file order;
        # the reason for stopping comes last, whatever its line.
        problems = sorted(self.report.problems, key=lambda problem: problem.line or 0)
        if stop is None:
            return CsvRejected(problems, False, self.report.total)
        problems.append(stop.problem)
        return CsvRejected(problems, stop.too_large, self.report.total + 1)

    def _read(self) -> None:
        reader = csv.reader(self.lines, strict=True)
        columns: dict[str, int] | None = None
        header_line = 0
        while True:
            line = reader.line_num + 1  # the physical line this row starts on
            try:
                cells = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                self._malformed(exc, line)
                if columns is None:
                    return
                self._count_row(line)  # a broken row still costs work: it counts
                continue
            if not any(cell.strip() for cell in cells):
                continue  # blank line
            if columns is None:
                columns = self._header(cells, line)
                header_line = line
                if columns is None:
                    return  # rows mean nothing without the columns
                self.header_width = _filled_width(cells)
                continue
            self._row(cells, columns, line)
        if columns is None and not self.report.total:
            self.report.add(Problem("the file is empty: expected a header row", 1))
        elif columns is not None and not self.row_count and not self.report.total:
            self.report.add(Problem("no product rows after the header", header_line + 1))

    def _malformed(self, error: csv.Error, line: int) -> None:
        message = str(error)
        if message.startswith("field larger than field limit"):
            # The reader has lost its place: whatever it reads next is noise.
            limit = csv.field_size_limit()
            message = (
                f"a cell starting on this line is longer than {limit} characters; "
                "if it opens a quote, that quote is never closed"
            )
            raise _Stop(Problem(message, line), too_large=False)
        plain = next((text for key, text in _CSV_ERRORS.items() if key in message), message)
        self.report.add(Problem(f"not a valid CSV row: {plain}", line))

    def _header(self, cells: list[str], line: int) -> dict[str, int] | None:
        if separator := _foreign_separator(cells):
            message = f"the file is separated by {separator}, but commas are expected"
            self.report.add(Problem(f"{message}: save it as CSV (comma delimited)", line))
            return None
        wanted = {_header_key(name): name for name in COLUMNS}
        found: dict[str, int] = {}
        for index, cell in enumerate(cells):
            name = wanted.get(_header_key(cell))
            if name is None:
                continue  # extra columns are allowed and ignored
            if name in found:
                self.report.add(Problem("column appears more than once", line, name))
            found.setdefault(name, index)
        for name in COLUMNS:
            if name not in found:
                self.report.add(Problem(f"missing column {name!r}", line, name))
        return found if len(found) == len(COLUMNS) else None

    def _count_row(self, line: int) -> None:
        self.row_count += 1
        if self.row_count > self.limits.max_rows:
            raise _Stop(Problem(f"more than {self.limits.max_rows} rows", line), too_large=True)

    def _row(self, cells: list[str], columns: dict[str, int], line: int) -> None:
        self._count_row(line)

        def cell(name: str) -> str:
            index = columns[name]
            return cells[index].strip() if index < len(cells) else ""

        if all(_header_key(cell(name)) == _header_key(name) for name in COLUMNS):
            self.report.add(Problem("the header is repeated on this line", line))
            return
        problems_before = self.report.total
        self._check_width(cells, line)
        serial, product = cell(SERIAL), cell(PRODUCT)
        self._check_serial(serial, line)
        self._check_product(product, line)
        urls = self._checked_urls(cell(URLS), line)

        self.image_count += len(urls)
        if self.image_count > self.limits.max_images:
            raise _Stop(
                Problem(f"more than {self.limits.max_images} images in total", line, URLS),
                too_large=True,
            )
        if self.report.total == problems_before:
            self.rows.append(Row(serial_number=serial, product_name=product, input_urls=urls))

    def _check_width(self, cells: list[str], line: int) -> None:
        """Cells past the header's columns are data the columns would silently drop;
        trailing empty ones (Excel exports them) are fine."""
        width = _filled_width(cells)
        if width <= self.header_width:
            return
        if sum(1 for text in cells if _HTTP_URL.match(text.strip())) > 1:
            hint = f"quote the {URLS} cell when it holds several URLs"
        else:
            hint = "quote any cell that holds a comma"
        message = f"row has {width} cells but the header has {self.header_width}: {hint}"
        self.report.add(Problem(message, line))

    def _check_serial(self, serial: str, line: int) -> None:
        if not serial:
            self.report.add(Problem("serial number is empty", line, SERIAL))
        elif serial in self.serials:
            message = f"duplicate serial number {serial!r} (first on line {self.serials[serial]})"
            self.report.add(Problem(message, line, SERIAL))
        else:
            self.serials[serial] = line

    def _check_product(self, product: str, line: int) -> None:
        if not _has_visible_text(product):
            self.report.add(Problem("product name is empty", line, PRODUCT))
        elif control := _NAME_CONTROL_CHARS.search(product):
            message = f"product name contains a control character (U+{ord(control[0]):04X})"
            self.report.add(Problem(message, line, PRODUCT))

    def _checked_urls(self, cell: str, line: int) -> list[str]:
        urls: list[str] = []
        for url, after_url in _url_pieces(cell):
            urls.append(url)
            if reason := url_problem(url, self.limits.allow_private_urls):
                if after_url and not _SCHEME.match(url):
                    reason += " (a comma inside a URL must be written %2C)"
                self.report.add(Problem(reason, line, URLS))
        if not urls:
            self.report.add(Problem("no image URLs", line, URLS))
        return urls


def _header_key(name: str) -> str:
    """Header names match without regard to case, surrounding spaces or a BOM."""
    return " ".join(name.replace("\ufeff", "").split()).casefold()


def _foreign_separator(cells: list[str]) -> str | None:
    """How a header row of one cell is separated, when by ';' or tabs (Excel in many
    locales, "Text (Tab delimited)") instead of commas."""
    filled = [cell for cell in cells if cell.strip()]
    if len(filled) != 1:
        return None
    semicolons, tabs = filled[0].count(";"), filled[0].count("\t")
    if not semicolons and not tabs:
        return None
    return "';'" if semicolons >= tabs else "tabs"


def _filled_width(cells: list[str]) -> int:
    """The number of cells up to the last non-blank one."""
    width = len(cells)
    while width and not cells[width - 1].strip():
        width -= 1
    return width


def _has_visible_text(text: str) -> bool:
    """False for text made only of whitespace and invisible format characters."""
    return any(not char.isspace() and unicodedata.category(char) != "Cf" for char in text)
