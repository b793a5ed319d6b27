"""The CSV's header and rows, checked against the limits; every problem names its line."""

from __future__ import annotations

import csv
import re
import unicodedata
from dataclasses import dataclass
from typing import BinaryIO

from imgpipe.contracts.events import Row
from imgpipe.contracts.urls import url_problem
from imgpipe.ingest.csv_input.decoding import Lines
from imgpipe.ingest.csv_input.report import Report, Stop
from imgpipe.ingest.csv_input.urls import has_scheme, is_http_url, url_pieces
from imgpipe.ingest.domain import Problem

SERIAL = "S. No."
PRODUCT = "Product Name"
URLS = "Input Image Urls"
COLUMNS = (SERIAL, PRODUCT, URLS)

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


def parse_csv(stream: BinaryIO, limits: CsvLimits) -> ParsedCsv:
    """Parse and validate the whole upload; raises CsvRejected naming every problem."""
    return _Parser(stream, limits).run()


class _Parser:
    def __init__(self, stream: BinaryIO, limits: CsvLimits) -> None:
        self.limits = limits
        self.report = Report()
        self.lines = Lines(stream, limits.max_bytes, self.report)
        self.rows: list[Row] = []
        self.row_count = 0
        self.image_count = 0
        self.serials: dict[str, int] = {}
        self.header_width = 0  # cells up to the header's last named one

    def run(self) -> ParsedCsv:
        try:
            self._read()
        except Stop as stop:
            raise self._rejected(stop) from None
        if self.report.total:
            raise self._rejected()
        return ParsedCsv(self.rows, self.image_count)

    def _rejected(self, stop: Stop | None = None) -> CsvRejected:
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
            raise Stop(Problem(message, line), too_large=False)
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
            raise Stop(Problem(f"more than {self.limits.max_rows} rows", line), too_large=True)

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
            raise Stop(
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
        if sum(1 for text in cells if is_http_url(text.strip())) > 1:
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
        for url, after_url in url_pieces(cell):
            urls.append(url)
            if reason := url_problem(url, self.limits.allow_private_urls):
                if after_url and not has_scheme(url):
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
