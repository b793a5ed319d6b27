"""Never worse than the input: a JPEG that needed no change is kept when its encode is larger."""

from __future__ import annotations

import io
import random
from typing import Any

import pytest
from PIL import Image, ImageChops, ImageCms

from imgpipe.contracts.events import Options
from imgpipe.processor.compress import compress
from imgpipe.processor.handlers import ImageOutcome, processed_event
from imgpipe.processor.jpeg_metadata import strip_metadata
from tests.support.icc import adobe_rgb
from tests.support.images import EXIF_ORIENTATION, photo

LIMIT = 50_000_000
_MAKE = 0x010F  # an EXIF tag that changes nothing about the pixels
_APP1, _APP2, _COM = b"\xff\xe1", b"\xff\xe2", b"\xff\xfe"


def srgb_profile() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def small_jpeg(orientation: int | None = None, icc: bytes | None = None, **save: Any) -> bytes:
    """200x150 at quality 30, with EXIF, a profile (sRGB unless told) and a comment."""
    exif = Image.Exif()
    exif[_MAKE] = "imgpipe test camera"
    if orientation is not None:
        exif[EXIF_ORIENTATION] = orientation
    buffer = io.BytesIO()
    photo(200, 150).save(
        buffer,
        "JPEG",
        quality=30,
        exif=exif.tobytes(),
        icc_profile=icc or srgb_profile(),
        comment=b"made by a test",
        **save,
    )
    return buffer.getvalue()


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def same_pixels(a: bytes, b: bytes) -> bool:
    return ImageChops.difference(decode(a), decode(b)).getbbox() is None


def encoded_size(data: bytes, quality: int) -> int:
    buffer = io.BytesIO()
    decode(data).save(buffer, "JPEG", quality=quality)
    return len(buffer.getvalue())


# compress() --------------------------------------------------------------------------


def test_well_compressed_jpeg_keeps_its_own_bytes_without_metadata() -> None:
    original = small_jpeg()
    result = compress(original, Options(quality=90), LIMIT)
    assert result.kept_input
    assert result.format == "jpeg" and (result.width, result.height) == (200, 150)
    assert len(result.data) < encoded_size(original, 90) and len(result.data) < len(original)
    assert same_pixels(result.data, original)
    output = decode(result.data)
    assert "exif" not in output.info and "icc_profile" not in output.info
    assert "comment" not in output.info
    for marker in (_APP1, _APP2, _COM):
        assert marker not in result.data.split(b"\xff\xda")[0]


def test_an_encode_that_is_smaller_is_kept() -> None:
    result = compress(small_jpeg(), Options(quality=10), LIMIT)
    assert not result.kept_input


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_a_jpeg_that_needed_turning_is_encoded(orientation: int) -> None:
    result = compress(small_jpeg(orientation=orientation), Options(quality=90), LIMIT)
    assert not result.kept_input
    assert "exif" not in decode(result.data).info


def test_orientation_1_changes_nothing() -> None:
    assert compress(small_jpeg(orientation=1), Options(quality=90), LIMIT).kept_input


def test_a_jpeg_that_needed_colour_conversion_is_encoded() -> None:
    result = compress(small_jpeg(icc=adobe_rgb()), Options(quality=90), LIMIT)
    assert not result.kept_input
    assert "icc_profile" not in decode(result.data).info


def test_a_cmyk_jpeg_is_encoded() -> None:
    buffer = io.BytesIO()
    photo(200, 150).convert("CMYK").save(buffer, "JPEG", quality=30)
    result = compress(buffer.getvalue(), Options(quality=90), LIMIT)
    assert not result.kept_input and decode(result.data).mode == "RGB"


def test_a_resized_jpeg_is_encoded() -> None:
    result = compress(small_jpeg(), Options(quality=90, max_side=100), LIMIT)
    assert not result.kept_input and (result.width, result.height) == (100, 75)


def test_a_max_side_the_image_already_fits_changes_nothing() -> None:
    assert compress(small_jpeg(), Options(quality=90, max_side=400), LIMIT).kept_input


def test_other_output_formats_are_encoded() -> None:
    result = compress(small_jpeg(), Options(quality=90, format="webp"), LIMIT)
    assert not result.kept_input and result.format == "webp"


def test_progressive_asked_keeps_only_a_progressive_input() -> None:
    progressive = Options(quality=90, progressive=True)
    assert not compress(small_jpeg(), progressive, LIMIT).kept_input
    assert compress(small_jpeg(progressive=True), progressive, LIMIT).kept_input


def test_a_png_is_never_kept() -> None:
    buffer = io.BytesIO()
    photo(200, 150).quantize(16).save(buffer, "PNG")  # small as a PNG gets, larger encoded
    result = compress(buffer.getvalue(), Options(quality=95), LIMIT)
    assert not result.kept_input and decode(result.data).format == "JPEG"


def test_a_jpeg_missing_its_end_is_encoded() -> None:
    original = small_jpeg()
    result = compress(original[:-2], Options(quality=90), LIMIT)
    assert not result.kept_input


# strip_metadata() --------------------------------------------------------------------


@pytest.mark.parametrize("progressive", [False, True])
def test_strip_keeps_the_picture_byte_for_byte(progressive: bool) -> None:
    original = small_jpeg(progressive=progressive)
    stripped = strip_metadata(original)
    assert stripped is not None and len(stripped) < len(original)
    assert same_pixels(stripped, original)
    scans = original.index(b"\xff\xda")
    assert stripped.endswith(original[scans:])  # everything from SOS on, untouched
    info = decode(stripped).info
    assert "jfif" in info  # APP0 stays
    assert not {"exif", "icc_profile", "comment"} & info.keys()


def test_strip_keeps_adobe_app14() -> None:
    buffer = io.BytesIO()
    photo(64, 48).convert("CMYK").save(buffer, "JPEG", exif=Image.Exif().tobytes())
    original = buffer.getvalue()
    assert b"\xff\xeeAdobe"[:2] in original
    stripped = strip_metadata(original)
    assert stripped is not None and b"Adobe" in stripped
    assert same_pixels(stripped, original)


def test_strip_drops_what_follows_the_end() -> None:
    original = small_jpeg()
    stripped = strip_metadata(original + b"a second picture or a payload")
    assert stripped is not None and stripped.endswith(b"\xff\xd9")
    assert stripped == strip_metadata(original)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage",
        b"\xff\xd8",
        b"\xff\xd8\xff\xe1\x00",  # a length cut in half
        b"\xff\xd8\xff\xe1\x00\x01rest",  # a length shorter than itself
        b"\xff\xd8\xff\xe1\xff\xffrest",  # a length past the end
        b"\xff\xd8\x00\x00\x00\x00",  # no marker where a segment starts
        b"\xff\xd8\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00\x12\x34",  # a scan that never ends
    ],
)
def test_strip_refuses_what_it_cannot_follow(data: bytes) -> None:
    assert strip_metadata(data) is None


def test_strip_never_raises_on_damaged_jpegs() -> None:
    original = small_jpeg()
    for cut in range(0, len(original), 7):
        assert strip_metadata(original[:cut]) is None  # no EOI yet: nothing to keep
    rng = random.Random(0)
    for _ in range(300):
        damaged = bytearray(original)
        for _ in range(4):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        strip_metadata(bytes(damaged))  # any answer but an exception


# The record and the event ------------------------------------------------------------


def test_the_record_and_the_event_say_which_was_kept() -> None:
    outcome = ImageOutcome(
        outcome="ok", processed_by="test", output_url="u", format="jpeg", kept_input=True
    )
    doc = outcome.to_doc() | {
        "request_id": "r",
        "image_key": "0-0",
        "row_index": 0,
        "position": 0,
        "input_url": "http://example.com/a.jpg",
    }
    assert doc["kept_input"] is True
    assert processed_event(doc).data.kept_input is True
    failed = ImageOutcome(outcome="failed", processed_by="test").to_doc()
    assert "kept_input" not in failed
