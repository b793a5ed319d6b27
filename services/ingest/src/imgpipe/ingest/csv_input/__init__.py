"""Streaming parser for the input CSV.

The upload is read in chunks, decoded incrementally and fed to `csv.reader` one
physical line at a time, so every problem can name the line its row starts on
(header = line 1). Problems are collected, not raised one by one: the client
gets the whole list in one answer. Hard limits (size, rows, images, listed
problems), binary content and a lost place in the CSV stop the parse early, so
the work done for any upload is bounded.

- `urls`: what makes an image or webhook URL acceptable, and how a cell lists URLs.
- `decoding`: a byte stream as physical lines of UTF-8 text.
- `report`: the problems found so far, and the signal that reading must stop.
- `parser`: the header and rows, checked against the limits.
"""

from imgpipe.ingest.csv_input.parser import CsvLimits, CsvRejected, ParsedCsv, parse_csv

__all__ = ["CsvLimits", "CsvRejected", "ParsedCsv", "parse_csv"]
