"""Strip a JPEG's metadata without re-encoding it: a walk over its segments.

A JPEG is SOI, then segments (marker 0xFFxx and a two-byte big-endian length that
counts itself), then SOS and the entropy-coded scans up to EOI. Only what a decoder
needs is kept, byte for byte: the tables and frame header, APP0 (JFIF) and APP14
(Adobe, which says how to read the colour). Every other APPn (EXIF, XMP, ICC, MPF,
Photoshop, a JFXX thumbnail) and every COM is dropped, as is anything after EOI. The
scans are walked too, marker by marker, so that EOI is the real one.

The ICC profile goes too: the caller strips only images that are sRGB already.
"""

from __future__ import annotations

_SOI = b"\xff\xd8"
_EOI = 0xD9
_SOS = 0xDA
_COM = 0xFE
_APP0, _APP14, _APP15 = 0xE0, 0xEE, 0xEF
# Markers that stand alone, without a length (TEM, RSTn); none other may come before SOS.
_STANDALONE = {0x01, *range(0xD0, 0xD8)}
# APP0 and APP14 are kept only when they are what a decoder reads them as.
_KEPT_APPS = {_APP0: b"JFIF\x00", _APP14: b"Adobe"}


def strip_metadata(data: bytes) -> bytes | None:
    """`data` without its metadata segments; None when it is not a JPEG the walk can
    follow to its end (a caller then keeps what it had)."""
    if not data.startswith(_SOI):
        return None
    kept = [_SOI]
    pos = 2
    while pos + 2 <= len(data):
        if data[pos] != 0xFF:
            return None  # a segment must start with a marker
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1  # fill byte before a marker: padding, dropped
            continue
        if marker in _STANDALONE:
            kept.append(data[pos : pos + 2])
            pos += 2
            continue
        end = _segment_end(data, pos)
        if end is None:
            return None
        if marker == _SOS:
            return _with_scans(data, kept, pos)
        if _keeps(marker, data[pos + 4 : end]):
            kept.append(data[pos:end])
        pos = end
    return None  # no SOS: no picture


def _segment_end(data: bytes, pos: int) -> int | None:
    """Where the segment at `pos` ends; None when its length is malformed or runs past the data."""
    if pos + 4 > len(data):
        return None
    length = int.from_bytes(data[pos + 2 : pos + 4], "big")
    end = pos + 2 + length
    return end if length >= 2 and end <= len(data) else None


def _with_scans(data: bytes, kept: list[bytes], sos: int) -> bytes | None:
    end = _end_of_image(data, sos)
    if end is None:
        return None
    kept.append(data[sos:end])
    return b"".join(kept)


def _end_of_image(data: bytes, pos: int) -> int | None:
    """Where EOI ends, walking from the segment at `pos` over scans and the tables between
    a progressive JPEG's scans; None when the data ends first."""
    while True:
        end = _segment_end(data, pos)
        marker = _next_marker(data, end) if end is not None else None
        if marker is None:
            return None
        if data[marker + 1] == _EOI:
            return marker + 2
        pos = marker


def _next_marker(data: bytes, pos: int) -> int | None:
    """The first marker at or after `pos` in entropy-coded data, where 0xFF00 is a stuffed
    0xFF byte, RSTn sits between intervals and 0xFFFF is fill."""
    while (pos := data.find(b"\xff", pos)) >= 0 and pos + 1 < len(data):
        following = data[pos + 1]
        if following != 0 and following != 0xFF and following not in _STANDALONE:
            return pos
        pos += 1
    return None


def _keeps(marker: int, payload: bytes) -> bool:
    if marker == _COM:
        return False
    if _APP0 <= marker <= _APP15:
        signature = _KEPT_APPS.get(marker)
        return signature is not None and payload.startswith(signature)
    return True  # tables, frame header, restart interval: what decodes the pixels
