"""ICC profiles written by hand, for the colour tests: Pillow can only create sRGB, Lab
and XYZ profiles, and the real ones (Adobe RGB, Display P3, ProPhoto, a press CMYK)
are not on every machine.

The RGB profiles are matrix/TRC profiles with their published D50 colorants and tone
curves; the CMYK one is a lut8 profile whose 16 corners map to chosen Lab colours.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

D50 = (0.9642, 1.0, 0.8249)
XYZ = tuple[float, float, float]


def _s15(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def _xyz(value: XYZ) -> bytes:
    return b"XYZ \0\0\0\0" + b"".join(_s15(v) for v in value)


def _text(text: str) -> bytes:
    return b"text\0\0\0\0" + text.encode() + b"\0"


def _desc(text: str) -> bytes:
    ascii_ = text.encode() + b"\0"
    return (
        b"desc\0\0\0\0"
        + struct.pack(">I", len(ascii_))
        + ascii_
        + b"\0" * 8  # no Unicode description
        + b"\0\0\0"  # no ScriptCode description
        + b"\0" * 67
    )


def _gamma(gamma: float) -> bytes:
    return b"curv\0\0\0\0" + struct.pack(">IH", 1, round(gamma * 256))


def _srgb_curve() -> bytes:
    # IEC 61966-2-1's curve as a parametric curve of type 3.
    params = (2.4, 1 / 1.055, 0.055 / 1.055, 1 / 12.92, 0.04045)
    return b"para\0\0\0\0" + struct.pack(">HH", 3, 0) + b"".join(_s15(p) for p in params)


def _profile(device_class: bytes, space: bytes, pcs: bytes, tags: dict[bytes, bytes]) -> bytes:
    table = bytearray(struct.pack(">I", len(tags)))
    data = bytearray()
    offset = 128 + 4 + 12 * len(tags)
    for signature, body in tags.items():
        padded = body + b"\0" * (-len(body) % 4)
        table += signature + struct.pack(">II", offset + len(data), len(body))
        data += padded
    size = 128 + len(table) + len(data)
    header = (
        struct.pack(">I", size)
        + b"\0\0\0\0"  # preferred CMM
        + b"\x02\x10\0\0"  # version 2.1
        + device_class
        + space
        + pcs
        + struct.pack(">6H", 2024, 1, 1, 0, 0, 0)
        + b"acsp"
        + b"\0" * 24  # platform, flags, manufacturer, model, attributes
        + struct.pack(">I", 0)  # rendering intent
        + b"".join(_s15(v) for v in D50)
        + b"\0" * 48  # creator, profile id, reserved
    )
    assert len(header) == 128
    return bytes(header + table + data)


def rgb_profile(name: str, red: XYZ, green: XYZ, blue: XYZ, curve: bytes) -> bytes:
    return _profile(
        b"mntr",
        b"RGB ",
        b"XYZ ",
        {
            b"desc": _desc(name),
            b"cprt": _text("No copyright, use freely"),
            b"wtpt": _xyz(D50),
            b"rXYZ": _xyz(red),
            b"gXYZ": _xyz(green),
            b"bXYZ": _xyz(blue),
            b"rTRC": curve,
            b"gTRC": curve,
            b"bTRC": curve,
        },
    )


def adobe_rgb() -> bytes:
    return rgb_profile(
        "Adobe RGB (1998) compatible",
        (0.6097, 0.3111, 0.0195),
        (0.2053, 0.6257, 0.0609),
        (0.1492, 0.0632, 0.7446),
        _gamma(563 / 256),
    )


def display_p3() -> bytes:
    return rgb_profile(
        "Display P3",
        (0.5151, 0.2412, -0.0011),
        (0.2920, 0.6922, 0.0419),
        (0.1571, 0.0666, 0.7841),
        _srgb_curve(),
    )


def prophoto() -> bytes:
    return rgb_profile(
        "ProPhoto RGB",
        (0.7977, 0.2880, 0.0),
        (0.1352, 0.7119, 0.0),
        (0.0313, 0.0001, 0.8251),
        _gamma(1.8),
    )


def grey_profile(gamma: float) -> bytes:
    return _profile(
        b"mntr",
        b"GRAY",
        b"XYZ ",
        {
            b"desc": _desc(f"Grey, gamma {gamma}"),
            b"cprt": _text("No copyright, use freely"),
            b"wtpt": _xyz(D50),
            b"kTRC": _gamma(gamma),
        },
    )


def cmyk_profile(corners: Sequence[tuple[float, float, float]]) -> bytes:
    """A CMYK profile whose 16 corners (C, M, Y, K each 0 or 100%, in ICC order: C
    slowest, K fastest) are the given Lab colours; LittleCMS interpolates between."""
    assert len(corners) == 16
    identity_matrix = b"".join(
        _s15(1.0 if row == col else 0.0) for row in range(3) for col in range(3)
    )
    linear = bytes(range(256))
    clut = b"".join(
        bytes((round(lightness * 255 / 100), round(a + 128), round(b + 128)))
        for lightness, a, b in corners
    )
    lut = (
        b"mft1\0\0\0\0"
        + bytes((4, 3, 2, 0))  # inputs, outputs, grid points, padding
        + identity_matrix
        + linear * 4
        + clut
        + linear * 3
    )
    return _profile(
        b"prtr",
        b"CMYK",
        b"Lab ",
        {
            b"desc": _desc("Test press CMYK"),
            b"cprt": _text("No copyright, use freely"),
            b"wtpt": _xyz(D50),
            b"A2B0": lut,
        },
    )


def press_like_cmyk() -> bytes:
    """Paper a little warm, inks as a press prints them, black not quite black."""
    paper, cyan, magenta, yellow = (95, 1, -2), (55, -37, -50), (48, 74, -3), (89, -5, 93)
    corners = []
    for c in (0, 1):
        for m in (0, 1):
            for y in (0, 1):
                for k in (0, 1):
                    inks = [ink for on, ink in ((c, cyan), (m, magenta), (y, yellow)) if on]
                    if not inks:
                        colour = paper
                    else:  # overprint: lightness multiplies, chroma adds up and fades
                        lightness = paper[0]
                        for ink in inks:
                            lightness *= ink[0] / paper[0]
                        a = sum(ink[1] for ink in inks) / len(inks) ** 0.5
                        b = sum(ink[2] for ink in inks) / len(inks) ** 0.5
                        colour = (lightness, a, b)
                    if k:
                        colour = (colour[0] * 0.12, colour[1] * 0.2, colour[2] * 0.2)
                    corners.append(colour)
    return cmyk_profile(corners)
