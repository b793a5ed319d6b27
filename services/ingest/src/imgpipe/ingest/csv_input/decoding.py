"""An uploaded byte stream as physical lines of UTF-8 text."""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from typing import BinaryIO

from imgpipe.ingest.csv_input.report import Report, Stop
from imgpipe.ingest.domain import Problem

CHUNK_SIZE = 64 * 1024

_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
_ZIP_MAGIC = b"PK\x03\x04"


class Lines:
    """Physical lines of a UTF-8 byte stream; undecodable bytes are noted, not fatal."""

    def __init__(self, stream: BinaryIO, max_bytes: int, report: Report) -> None:
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
                raise Stop(
                    Problem(f"file is larger than {self._max_bytes} bytes", field="file"),
                    too_large=True,
                )
            if self.bytes_read == len(chunk):
                _check_file_type(chunk)
            if b"\x00" in chunk:
                line = self._newlines + chunk[: chunk.index(b"\x00")].count(b"\n") + 1
                raise Stop(Problem("not a CSV: the file holds binary data", line), False)
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
        raise Stop(Problem("the file is UTF-16; save it as CSV UTF-8", 1), too_large=False)
    if start.startswith(_ZIP_MAGIC):
        message = "this is an Excel workbook (.xlsx); save it as CSV UTF-8"
        raise Stop(Problem(message, 1), too_large=False)
