"""Streaming parser for the input CSV (DESIGN.md, "CSV input").

The upload is read in chunks, decoded incrementally and fed to `csv.reader` one
physical line at a time, so every problem can name the line its row starts on
(header = line 1). Problems are collected, not raised one by one: the client
gets the whole list in one answer. Only hard limits (size, rows, images) and
binary content stop the parse early.
"""

from __future__ import annotations

import codecs
import csv
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO
from urllib.parse import urlsplit

from imgpipe.contracts.events import Row
from imgpipe.contracts.outbound import URLRefused, check_url

SERIAL = "S. No."
PRODUCT = "Product Name"
URLS = "Input Image Urls"
COLUMNS = (SERIAL, PRODUCT, URLS)

CHUNK_SIZE = 64 * 1024
MAX_URL_LENGTH = 2048
MAX_LISTED_PROBLEMS = 1000

_BAD_URL_CHARS = re.compile(r"[\s\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an upload; `line` is the CSV line, `field` a form field."""

    message: str
    line: int | None = None
    column: str | None = None
    field: str | None = None


@dataclass(frozen=True)
class CsvLimits:
    max_bytes: int
    max_rows: int
    max_images: int
    allow_private_urls: bool = False  # IMGPIPE_ALLOW_PRIVATE_URLS: the guard's address rule


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
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return f"not a valid URL: {url!r}"
    if parts.scheme.lower() not in ("http", "https"):
        return f"URL must start with http:// or https://: {url!r}"
    if "@" in parts.netloc:
        return f"URL must not contain credentials: {_redacted(url)!r}"
    if not parts.hostname:
        return f"URL has no host: {url!r}"
    try:
        check_url(url, allow_private)
    except URLRefused as refused:
        return f"URL refused: {refused.reason}: {url!r}"
    return None


def _redacted(url: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rpartition('@')[2]}"


def split_urls(cell: str) -> list[str]:
    """The comma-separated URLs of an `Input Image Urls` cell, in order, blanks dropped."""
    return [piece.strip() for piece in cell.split(",") if piece.strip()]


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
        pending = ""
        while chunk := self._stream.read(CHUNK_SIZE):
            self.bytes_read += len(chunk)
            if self.bytes_read > self._max_bytes:
                raise _Stop(
                    Problem(f"file is larger than {self._max_bytes} bytes", field="file"),
                    too_large=True,
                )
            if b"\x00" in chunk:
                line = self._newlines + chunk[: chunk.index(b"\x00")].count(b"\n") + 1
                raise _Stop(Problem("not a CSV: the file holds binary data", line), False)
            pending += self._decode(chunk, final=False)
            *lines, pending = pending.split("\n")
            yield from (line + "\n" for line in lines)
        pending += self._decode(b"", final=True)
        *lines, pending = pending.split("\n")
        yield from (line + "\n" for line in lines)
        if pending:
            yield pending

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


@dataclass
class _Report:
    """Problems in the order found, one per (line, column, message)."""

    problems: list[Problem] = field(default_factory=list)
    total: int = 0
    _seen: set[tuple[int | None, str | None, str]] = field(default_factory=set)

    def add(self, problem: Problem) -> None:
        key = (problem.line, problem.column, problem.message)
        if key in self._seen:
            return
        self._seen.add(key)
        self.total += 1
        if len(self.problems) < MAX_LISTED_PROBLEMS:
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

    def run(self) -> ParsedCsv:
        try:
            self._read()
        except _Stop as stop:
            self.report.add(stop.problem)
            raise self._rejected(too_large=stop.too_large) from None
        if self.report.total:
            raise self._rejected(too_large=False)
        return ParsedCsv(self.rows, self.image_count)

    def _rejected(self, too_large: bool) -> CsvRejected:
        # Decoding runs a chunk ahead of the rows, so sort to list problems in file order.
        problems = sorted(self.report.problems, key=lambda problem: problem.line or 0)
        return CsvRejected(problems, too_large, self.report.total)

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
                self.report.add(Problem(f"not a valid CSV row: {exc}", line))
                if columns is None:
                    return
                continue
            if not any(cell.strip() for cell in cells):
                continue  # blank line
            if columns is None:
                columns = self._header(cells, line)
                header_line = line
                if columns is None:
                    return  # rows mean nothing without the columns
                continue
            self._row(cells, columns, line)
        if columns is None and not self.report.total:
            self.report.add(Problem("the file is empty: expected a header row", 1))
        elif columns is not None and not self.row_count and not self.report.total:
            self.report.add(Problem("no product rows after the header", header_line + 1))

    def _header(self, cells: list[str], line: int) -> dict[str, int] | None:
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

    def _row(self, cells: list[str], columns: dict[str, int], line: int) -> None:
        self.row_count += 1
        if self.row_count > self.limits.max_rows:
            raise _Stop(Problem(f"more than {self.limits.max_rows} rows", line), too_large=True)

        def cell(name: str) -> str:
            index = columns[name]
            return cells[index].strip() if index < len(cells) else ""

        serial, product, urls = cell(SERIAL), cell(PRODUCT), split_urls(cell(URLS))
        problems_before = self.report.total
        if not serial:
            self.report.add(Problem("serial number is empty", line, SERIAL))
        elif serial in self.serials:
            message = f"duplicate serial number {serial!r} (first on line {self.serials[serial]})"
            self.report.add(Problem(message, line, SERIAL))
        else:
            self.serials[serial] = line
        if not product:
            self.report.add(Problem("product name is empty", line, PRODUCT))
        if not urls:
            self.report.add(Problem("no image URLs", line, URLS))
        for url in urls:
            if reason := url_problem(url, self.limits.allow_private_urls):
                self.report.add(Problem(reason, line, URLS))

        self.image_count += len(urls)
        if self.image_count > self.limits.max_images:
            raise _Stop(
                Problem(f"more than {self.limits.max_images} images in total", line, URLS),
                too_large=True,
            )
        if self.report.total == problems_before:
            self.rows.append(Row(serial_number=serial, product_name=product, input_urls=urls))


def _header_key(name: str) -> str:
    """Header names match without regard to case, surrounding spaces or a BOM."""
    return " ".join(name.replace("\ufeff", "").split()).casefold()
