"""The CSV parser on its own: streaming details that the HTTP tests do not reach."""

from __future__ import annotations

import csv
import io

import pytest

from imgpipe.ingest.csv_input import CsvLimits, CsvRejected, decoding, parse_csv
from imgpipe.ingest.csv_input.decoding import CHUNK_SIZE
from imgpipe.ingest.csv_input.report import MAX_LISTED_PROBLEMS

LIMITS = CsvLimits(max_bytes=10_000_000, max_rows=100_000, max_images=100_000)
HEADER = b"S. No.,Product Name,Input Image Urls\r\n"
URL_1 = b"https://a.example.com/1.jpg"
URL_2 = b"https://a.example.com/2.jpg"


def rejected(content: bytes, limits: CsvLimits = LIMITS) -> CsvRejected:
    with pytest.raises(CsvRejected) as caught:
        parse_csv(io.BytesIO(content), limits)
    return caught.value


def problems(content: bytes, limits: CsvLimits = LIMITS) -> list[tuple[int | None, str]]:
    return [(problem.line, problem.message) for problem in rejected(content, limits).problems]


def padded_to_chunk_edge(tail: bytes) -> bytes:
    """A CSV whose first chunk ends in the middle of `tail` (a multi-byte character)."""
    filler = b"1,Shirt,https://img.example.com/a.jpg\r\n"
    body = HEADER + filler
    name_start = len(body) + len(b"2,")
    padding = CHUNK_SIZE - name_start - 1  # the chunk ends after tail's first byte
    return body + b"2," + b"x" * padding + tail + b",https://img.example.com/b.jpg\r\n"


def test_multibyte_character_split_across_chunks() -> None:
    parsed = parse_csv(io.BytesIO(padded_to_chunk_edge("é".encode())), LIMITS)
    assert parsed.rows[1].product_name.endswith("xé")


def test_bad_byte_after_first_chunk_names_its_line() -> None:
    content = padded_to_chunk_edge(b"\xff") + b"3,Ok,https://img.example.com/c.jpg\r\n"
    with pytest.raises(CsvRejected) as caught:
        parse_csv(io.BytesIO(content), LIMITS)
    assert [(problem.line, problem.message) for problem in caught.value.problems] == [
        (3, "not UTF-8 text")
    ]


def test_lf_crlf_blank_lines_and_quoted_newlines() -> None:
    content = (
        b"\n"
        + HEADER
        + b'1,"Shirt\r\nwith two lines","https://a.example.com/1.jpg,,https://a.example.com/2.jpg"\n'
        + b"  ,  ,  \r\n"
        + b"2,Hat,https://a.example.com/3.jpg"  # no final newline
    )
    parsed = parse_csv(io.BytesIO(content), LIMITS)
    assert [row.serial_number for row in parsed.rows] == ["1", "2"]
    assert parsed.rows[0].input_urls == [
        "https://a.example.com/1.jpg",
        "https://a.example.com/2.jpg",
    ]
    assert parsed.image_count == 3


def test_problem_list_is_capped_and_reading_stops() -> None:
    rows = b"".join(b"%d,,https://a.example.com/x.jpg\n" % n for n in range(1500))
    refused = rejected(HEADER + rows)
    assert refused.total == MAX_LISTED_PROBLEMS + 1
    assert len(refused.problems) == MAX_LISTED_PROBLEMS + 1
    last = refused.problems[-1]
    assert (last.line, last.message) == (
        MAX_LISTED_PROBLEMS + 2,
        f"too many problems: reading stopped on this line; "
        f"the first {MAX_LISTED_PROBLEMS} are listed",
    )


# 1: cells past the header's width


@pytest.mark.parametrize(
    "content",
    [
        HEADER + b"1,Shirt," + URL_1 + b"," + URL_2 + b"\r\n",
        b"S. No.,Input Image Urls,Product Name\r\n1," + URL_1 + b"," + URL_2 + b",Shirt\r\n",
    ],
    ids=["urls-last", "urls-in-the-middle"],
)
def test_unquoted_urls_past_the_header_are_refused(content: bytes) -> None:
    assert problems(content) == [
        (
            2,
            "row has 4 cells but the header has 3: "
            "quote the Input Image Urls cell when it holds several URLs",
        )
    ]


def test_trailing_empty_cells_and_named_extra_columns_are_accepted() -> None:
    content = (
        b"S. No.,Product Name,Input Image Urls,Notes\r\n"
        + b"1,Shirt,"
        + URL_1
        + b",a note,,\r\n"
        + b"2,Hat,"
        + URL_2
        + b",,\r\n"
    )
    parsed = parse_csv(io.BytesIO(content), LIMITS)
    assert [row.input_urls for row in parsed.rows] == [[URL_1.decode()], [URL_2.decode()]]


# 2: bounded work on broken files


def test_malformed_rows_count_toward_the_row_limit() -> None:
    limits = CsvLimits(max_bytes=10_000_000, max_rows=3, max_images=100)
    refused = rejected(HEADER + b'"a"b\n' * 5, limits)
    assert refused.too_large
    assert (refused.problems[-1].line, refused.problems[-1].message) == (5, "more than 3 rows")


def test_reading_stops_once_the_problem_list_is_full() -> None:
    stream = io.BytesIO(HEADER + b'"a"b\n' * 100_000)  # 500 kB of malformed rows
    with pytest.raises(CsvRejected) as caught:
        parse_csv(stream, LIMITS)
    assert len(caught.value.problems) == MAX_LISTED_PROBLEMS + 1
    assert caught.value.problems[-1].message.startswith("too many problems")
    assert stream.tell() <= 2 * CHUNK_SIZE


def test_a_cell_over_the_field_limit_stops_with_one_problem() -> None:
    # An unclosed quote swallows the file until the cell passes csv's field limit;
    # everything read after that is noise.
    swallowed = b"2,Hat\n" * (csv.field_size_limit() // 6 + 1)
    after = b"".join(b"%d,,ftp://x\n" % n for n in range(3, 500))
    assert problems(HEADER + b'1,"Shirt,' + URL_1 + b"\n" + swallowed + after) == [
        (
            2,
            f"a cell starting on this line is longer than {csv.field_size_limit()} characters; "
            "if it opens a quote, that quote is never closed",
        )
    ]


# 3: byte order mark


def test_bom_before_a_quoted_header_is_accepted() -> None:
    content = b'\xef\xbb\xbf"S. No.","Product Name","Input Image Urls"\r\n"1","Shirt","'
    parsed = parse_csv(io.BytesIO(content + URL_1 + b'"\r\n'), LIMITS)
    assert [(row.serial_number, row.product_name) for row in parsed.rows] == [("1", "Shirt")]


def test_bom_alone_is_an_empty_file() -> None:
    assert problems(b"\xef\xbb\xbf") == [(1, "the file is empty: expected a header row")]


def test_bom_then_blank_line_then_header_is_accepted() -> None:
    parsed = parse_csv(io.BytesIO(b"\xef\xbb\xbf\r\n" + HEADER + b"1,Shirt," + URL_1), LIMITS)
    assert [row.serial_number for row in parsed.rows] == ["1"]


# 4, 5: wrong separators and wrong file types are named


@pytest.mark.parametrize(
    ("separator", "named"), [(b";", "';'"), (b"\t", "tabs")], ids=["semicolon", "tab"]
)
def test_other_separator_is_named(separator: bytes, named: str) -> None:
    header = separator.join([b"S. No.", b"Product Name", b"Input Image Urls"])
    content = header + b"\r\n1" + separator + b"Shirt" + separator + URL_1 + b"\r\n"
    assert problems(content) == [
        (
            1,
            f"the file is separated by {named}, but commas are expected: "
            "save it as CSV (comma delimited)",
        )
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            b"\xff\xfe" + HEADER.decode().encode("utf-16-le"),
            "the file is UTF-16; save it as CSV UTF-8",
        ),
        (
            b"\xfe\xff" + HEADER.decode().encode("utf-16-be"),
            "the file is UTF-16; save it as CSV UTF-8",
        ),
        (
            b"PK\x03\x04\x14\x00\x06\x00" + b"x" * 100,
            "this is an Excel workbook (.xlsx); save it as CSV UTF-8",
        ),
    ],
    ids=["utf-16-le", "utf-16-be", "xlsx"],
)
def test_other_file_types_are_named(content: bytes, message: str) -> None:
    assert problems(content) == [(1, message)]


# 6, 11: URLs that would surely fail later


def test_invisible_character_in_the_csv_names_its_line() -> None:
    content = HEADER + b"1,Shirt," + "https://a.example.com/1.jpg\u200b".encode() + b"\r\n"
    assert problems(content) == [
        (2, "URL contains an invisible character (U+200B): 'https://a.example.com/1.jpg\\u200b'")
    ]


# 7, 8: separators inside the URL cell


@pytest.mark.parametrize("line_break", [b"\n", b"\r\n", b"\r"], ids=["lf", "crlf", "cr"])
def test_line_breaks_separate_urls_in_a_cell(line_break: bytes) -> None:
    content = HEADER + b'1,Shirt,"' + URL_1 + line_break + line_break + URL_2 + b'"\r\n'
    parsed = parse_csv(io.BytesIO(content), LIMITS)
    assert parsed.rows[0].input_urls == [URL_1.decode(), URL_2.decode()]


def test_comma_inside_a_url_gets_a_hint() -> None:
    url = b"https://res.cloudinary.com/demo/image/upload/w_100,h_100,c_fill/sample.jpg"
    hint = " (a comma inside a URL must be written %2C)"
    assert problems(HEADER + b'1,Shirt,"' + url + b'"\r\n') == [
        (2, "URL must start with http:// or https://: 'h_100'" + hint),
        (2, "URL must start with http:// or https://: 'c_fill/sample.jpg'" + hint),
    ]


def test_piece_without_scheme_and_no_url_before_it_gets_no_hint() -> None:
    assert problems(HEADER + b'1,Shirt,"www.example.com/1.jpg,' + URL_1 + b'"\r\n') == [
        (2, "URL must start with http:// or https://: 'www.example.com/1.jpg'")
    ]


# 9: csv errors in plain words


@pytest.mark.parametrize(
    ("content", "line", "message"),
    [
        (
            HEADER + b"1,Shirt," + URL_1 + b"\r2,Hat," + URL_2 + b"\r",
            2,
            "lines end with CR alone (old Mac format); save the file with CRLF or LF line endings",
        ),
        (
            HEADER + b"1,Shirt," + URL_1 + b'\r\n2,"Hat,' + URL_2 + b"\r\n",
            3,
            "a quote opened on this line is never closed",
        ),
        (
            HEADER + b'1,"Shirt"x,' + URL_1 + b"\r\n",
            2,
            "text right after a closing quote; "
            'quote the whole cell and write a quote inside it as ""',
        ),
    ],
    ids=["cr-line-endings", "quote-never-closed", "text-after-closing-quote"],
)
def test_csv_errors_are_in_plain_words(content: bytes, line: int, message: str) -> None:
    assert problems(content) == [(line, f"not a valid CSV row: {message}")]


def test_repeated_header_is_named() -> None:
    content = HEADER + b"1,Shirt," + URL_1 + b"\r\n" + HEADER + b"2,Hat," + URL_2 + b"\r\n"
    assert problems(content) == [(3, "the header is repeated on this line")]


# 10: product names


def test_product_name_with_a_control_character_is_refused() -> None:
    content = HEADER + b"1,Shirt\x1b[31m," + URL_1 + b"\r\n"
    assert problems(content) == [(2, "product name contains a control character (U+001B)")]


@pytest.mark.parametrize("name", ["\u200b", " \u200e\u00a0\ufeff "], ids=["zwsp", "mixed"])
def test_product_name_of_invisible_characters_is_empty(name: str) -> None:
    content = HEADER + b"1," + name.encode() + b"," + URL_1 + b"\r\n"
    assert problems(content) == [(2, "product name is empty")]


# 12: long lines


def test_a_line_across_many_chunks_is_read_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    # The splitter keeps an unfinished line in pieces (scanning only new text, so a long
    # line costs linear time): they must join up, whatever the chunk boundaries.
    monkeypatch.setattr(decoding, "CHUNK_SIZE", 256)
    # Blank cells keep every cell under csv's field limit.
    long_row = b"1,Shirt," + URL_1 + (b"," + b" " * 100_000) * 20 + b"\r\n"
    parsed = parse_csv(io.BytesIO(HEADER + long_row + b"2,Hat," + URL_2 + b"\r\n"), LIMITS)
    assert [row.input_urls for row in parsed.rows] == [[URL_1.decode()], [URL_2.decode()]]
