"""The CSV parser on its own: streaming details that the HTTP tests do not reach."""

from __future__ import annotations

import io

import pytest

from imgpipe.ingest.csv_input import CHUNK_SIZE, CsvLimits, CsvRejected, parse_csv

LIMITS = CsvLimits(max_bytes=10_000_000, max_rows=100_000, max_images=100_000)
HEADER = b"S. No.,Product Name,Input Image Urls\r\n"


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


def test_problem_list_is_capped_but_counted() -> None:
    rows = b"".join(b"%d,,https://a.example.com/x.jpg\n" % n for n in range(1500))
    with pytest.raises(CsvRejected) as caught:
        parse_csv(io.BytesIO(HEADER + rows), LIMITS)
    assert caught.value.total == 1500
    assert len(caught.value.problems) == 1000
