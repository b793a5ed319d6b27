"""Output colours: every input, whatever its colour space, comes out as sRGB.

Each case compares the output with a reference conversion of the decoded input (LittleCMS,
from the embedded profile to sRGB), as mean colour difference in CIELAB (delta E 1976:
about 2.3 is the smallest difference most people see). Each also checks that the output
is far from the input's numbers taken as sRGB, so that skipping the conversion fails."""

from __future__ import annotations

import io
import math

import pytest
from PIL import Image, ImageCms

from imgpipe.contracts.events import Options
from imgpipe.processor.compress import compress
from tests.support import icc

LIMIT = 50_000_000
SRGB = ImageCms.createProfile("sRGB")


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def reference(original: bytes) -> Image.Image:
    """The decoded input converted by LittleCMS from its own profile to sRGB."""
    image = decode(original)
    profile = ImageCms.ImageCmsProfile(io.BytesIO(image.info["icc_profile"]))
    out_mode = "RGB"
    converted = ImageCms.profileToProfile(
        image,
        profile,
        SRGB,
        renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC,
        outputMode=out_mode,
        flags=ImageCms.Flags.BLACKPOINTCOMPENSATION,
    )
    assert converted is not None
    return converted


def lab(rgb: tuple[int, int, int]) -> tuple[float, float, float]:
    """sRGB (D65) to CIELAB (D65 white), by the formulas of IEC 61966-2-1 and CIE 15."""

    def linear(value: int) -> float:
        c = value / 255
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(v) for v in rgb)
    x = (0.4124 * r + 0.3576 * g + 0.1805 * b) / 0.95047
    y = 0.2126 * r + 0.7152 * g + 0.0722 * b
    z = (0.0193 * r + 0.1192 * g + 0.9505 * b) / 1.08883

    def f(t: float) -> float:
        return t ** (1 / 3) if t > (6 / 29) ** 3 else t / (3 * (6 / 29) ** 2) + 4 / 29

    return 116 * f(y) - 16, 500 * (f(x) - f(y)), 200 * (f(y) - f(z))


def mean_delta_e(a: Image.Image, b: Image.Image) -> float:
    """Over the middle of each 16x16 patch: JPEG's upsampled chroma blurs the edges."""
    assert a.size == b.size
    width, height = a.size
    middles = [
        (x + 4, y + 4, x + 12, y + 12) for y in range(0, height, 16) for x in range(0, width, 16)
    ]
    differences = []
    for box in middles:
        left = a.convert("RGB").crop(box).get_flattened_data()
        right = b.convert("RGB").crop(box).get_flattened_data()
        for p, q in zip(left, right, strict=True):
            differences.append(math.dist(lab(p), lab(q)))
    return sum(differences) / len(differences)


PATCHES = [
    (230, 20, 30), (20, 200, 40), (30, 40, 220), (240, 220, 30),
    (250, 250, 250), (128, 128, 128), (10, 10, 10), (200, 120, 90),
    (40, 180, 200), (180, 60, 190), (90, 60, 30), (150, 200, 120),
]  # fmt: skip


def saturated() -> Image.Image:
    """Patches of strong colours, where colour spaces differ most, and neutrals; each
    patch a whole 16x16 JPEG block, so chroma subsampling does not blur them together."""
    image = Image.new("RGB", (64, 48))
    for index, colour in enumerate(PATCHES):
        x, y = index % 4 * 16, index // 4 * 16
        image.paste(colour, (x, y, x + 16, y + 16))
    return image


@pytest.mark.parametrize(
    "profile",
    [icc.adobe_rgb(), icc.display_p3(), icc.prophoto()],
    ids=["adobe-rgb", "display-p3", "prophoto"],
)
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_wide_gamut_rgb_is_converted_to_srgb(profile: bytes, fmt: str) -> None:
    original = encode(saturated(), fmt, icc_profile=profile, quality=95)
    output = decode(compress(original, Options(quality=90), LIMIT).data)
    assert output.mode == "RGB"
    assert "icc_profile" not in output.info  # untagged: sRGB, as every browser assumes
    assert mean_delta_e(output, reference(original)) < 2
    assert mean_delta_e(output, decode(original)) > 5  # the conversion did something


def cmyk_picture() -> Image.Image:
    return saturated().convert("CMYK")


def test_cmyk_jpeg_with_a_profile_is_converted_with_it() -> None:
    # Pillow writes CMYK JPEGs as Photoshop does: inverted, with an Adobe APP14 marker.
    original = encode(cmyk_picture(), "JPEG", quality=95, icc_profile=icc.press_like_cmyk())
    assert b"Adobe" in original[:200]
    result = compress(original, Options(quality=90), LIMIT)
    output = decode(result.data)
    assert result.format == "jpeg" and output.mode == "RGB"
    assert "icc_profile" not in output.info
    assert mean_delta_e(output, reference(original)) < 2.5
    naive = decode(original).convert("RGB")
    assert mean_delta_e(output, naive) > 5


def test_cmyk_without_a_profile_becomes_rgb() -> None:
    original = encode(cmyk_picture(), "JPEG", quality=95)
    output = decode(compress(original, Options(quality=90), LIMIT).data)
    assert output.mode == "RGB"
    # Pillow's own conversion: the inks subtracted from white.
    assert mean_delta_e(output, decode(original).convert("RGB")) < 2.5
    assert mean_delta_e(output, saturated()) < 4  # and the picture it was made from


def test_cmyk_with_an_rgb_profile_ignores_the_profile() -> None:
    original = encode(cmyk_picture(), "JPEG", quality=95, icc_profile=icc.adobe_rgb())
    output = decode(compress(original, Options(quality=90), LIMIT).data)
    assert output.mode == "RGB"
    assert mean_delta_e(output, decode(original).convert("RGB")) < 2.5


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_grey_with_a_profile_stays_grey_with_the_srgb_tone_curve(fmt: str) -> None:
    grey = Image.linear_gradient("L").resize((64, 48))
    original = encode(grey, fmt, icc_profile=icc.grey_profile(1.0), quality=95)
    output = decode(compress(original, Options(quality=90), LIMIT).data)
    assert output.mode == "L"
    assert "icc_profile" not in output.info
    assert mean_delta_e(output, reference(original)) < 2
    assert mean_delta_e(output, decode(original)) > 5  # linear grey is far darker as sRGB


def test_transparent_image_with_a_profile_keeps_its_alpha() -> None:
    image = saturated().convert("RGBA")
    image.putalpha(Image.linear_gradient("L").resize((64, 48)))
    original = encode(image, "PNG", icc_profile=icc.display_p3())
    result = compress(original, Options(quality=90), LIMIT)
    output = decode(result.data)
    assert result.format == "webp" and output.mode == "RGBA"
    low, high = output.getchannel("A").getextrema()
    assert low <= 3 and high >= 252
    opaque = Image.new("RGB", image.size)
    reference_rgba = reference(original)
    opaque.paste(reference_rgba.convert("RGB"))
    assert mean_delta_e(output.convert("RGB"), opaque) < 4  # WebP's 4:2:0 chroma


def test_srgb_profile_needs_no_conversion_and_is_dropped() -> None:
    srgb = ImageCms.ImageCmsProfile(SRGB).tobytes()
    original = encode(saturated(), "PNG", icc_profile=srgb)
    output = decode(compress(original, Options(quality=90), LIMIT).data)
    assert "icc_profile" not in output.info
    assert mean_delta_e(output, decode(original)) < 2


def test_a_profile_littlecms_refuses_leaves_the_pixels_as_they_are() -> None:
    broken = icc.adobe_rgb()
    broken = broken[:128] + b"\xff" * 16 + broken[144:]  # a well-formed header, a junk tag table
    original = encode(saturated(), "PNG", icc_profile=broken)
    result = compress(original, Options(quality=90), LIMIT)
    assert mean_delta_e(decode(result.data), saturated()) < 2
