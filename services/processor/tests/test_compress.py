"""compress(): what a user sees in the output file."""

from __future__ import annotations

import io
import pickle

import pytest
from PIL import Image, ImageChops, ImageCms, ImageStat

from imgpipe.processor.compress import CompressError, compress
from tests.support.images import (
    EXIF_ORIENTATION,
    exif_rotated_jpeg_bytes,
    jpeg_bytes,
    photo,
    png_with_alpha_bytes,
)

LIMIT = 50_000_000


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def srgb_profile() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def tiny(width: int, height: int) -> Image.Image:
    return Image.linear_gradient("L").resize((width, height)).convert("RGB")


def mean_difference(a: Image.Image, b: Image.Image) -> float:
    return sum(ImageStat.Stat(ImageChops.difference(a.convert("RGB"), b.convert("RGB"))).mean) / 3


def test_jpeg_at_quality_50_is_smaller_and_keeps_its_size() -> None:
    original = jpeg_bytes(640, 480, quality=95)
    result = compress(original, 50, LIMIT)
    output = decode(result.data)
    assert result.format == "jpeg" and output.format == "JPEG"
    assert len(result.data) < len(original)
    assert (result.width, result.height) == output.size == (640, 480)
    assert mean_difference(output, decode(original)) < 8  # still the same picture


def test_lower_quality_gives_smaller_files() -> None:
    original = jpeg_bytes(640, 480, quality=95)
    assert len(compress(original, 30, LIMIT).data) < len(compress(original, 80, LIMIT).data)


def test_png_with_alpha_becomes_webp_with_alpha() -> None:
    original = png_with_alpha_bytes(320, 240)
    result = compress(original, 50, LIMIT)
    output = decode(result.data)
    assert result.format == "webp" and output.format == "WEBP"
    assert output.mode == "RGBA"
    assert output.getchannel("A").getextrema() == (0, 255)
    assert output.getpixel((0, 0))[3] == 0  # corners stay transparent
    assert output.getpixel((160, 120))[3] == 255
    assert len(result.data) < len(original)


def test_alpha_channel_that_is_fully_opaque_becomes_jpeg() -> None:
    original = encode(photo(200, 100).convert("RGBA"), "PNG")
    result = compress(original, 50, LIMIT)
    assert result.format == "jpeg"
    assert decode(result.data).mode == "RGB"


def test_palette_gif_with_transparency_becomes_webp_from_its_first_frame() -> None:
    first = Image.new("P", (60, 40), 1)
    first.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    first.paste(0, (0, 0, 30, 40))
    second = Image.new("P", (60, 40), 1)
    second.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    original = encode(first, "GIF", save_all=True, append_images=[second], transparency=0)
    result = compress(original, 50, LIMIT)
    output = decode(result.data)
    assert result.format == "webp"
    assert getattr(output, "n_frames", 1) == 1
    assert output.getpixel((10, 20))[3] == 0  # the first frame's transparent half
    assert output.getpixel((50, 20))[2] > 200  # and its blue half


def test_exif_orientation_is_applied() -> None:
    original = exif_rotated_jpeg_bytes(400, 200)
    result = compress(original, 50, LIMIT)
    output = decode(result.data)
    assert (result.width, result.height) == output.size == (200, 400)
    assert output.getexif().get(EXIF_ORIENTATION) is None  # viewers must not rotate it again
    upright = photo(400, 200).transpose(Image.Transpose.ROTATE_270)  # what orientation 6 shows
    wrong_way = photo(400, 200).transpose(Image.Transpose.ROTATE_90)
    assert mean_difference(output, upright) < 8
    assert mean_difference(output, upright) < mean_difference(output, wrong_way) / 3


def test_small_images_are_never_upscaled() -> None:
    for original in (
        encode(tiny(16, 12), "JPEG", quality=95),
        encode(tiny(9, 7).convert("RGBA"), "PNG"),
    ):
        result = compress(original, 50, LIMIT)
        assert (result.width, result.height) == decode(result.data).size
        assert decode(result.data).size == decode(original).size


def test_icc_profile_is_kept_and_other_metadata_dropped() -> None:
    icc = srgb_profile()
    exif = Image.Exif()
    exif[0x010F] = "CameraMaker"  # Make
    original = encode(photo(120, 80), "JPEG", quality=95, icc_profile=icc, exif=exif.tobytes())
    output = decode(compress(original, 50, LIMIT).data)
    assert output.info.get("icc_profile") == icc
    assert "exif" not in output.info
    assert len(output.getexif()) == 0


def test_icc_profile_is_kept_in_webp() -> None:
    icc = srgb_profile()
    image = photo(120, 80).convert("RGBA")
    image.putalpha(Image.linear_gradient("L").resize((120, 80)))
    output = decode(compress(encode(image, "PNG", icc_profile=icc), 50, LIMIT).data)
    assert output.format == "WEBP"
    assert output.info.get("icc_profile") == icc


@pytest.mark.parametrize("pixels", [1.5, 3.0], ids=["warning-range", "error-range"])
def test_decompression_bomb_is_refused(pixels: float) -> None:
    original = encode(Image.new("L", (1000, 1000)), "PNG")  # tiny file, a million pixels
    with pytest.raises(CompressError) as raised:
        compress(original, 50, int(1_000_000 / pixels))
    assert raised.value.code == "image_too_large"


def test_a_side_too_long_for_the_output_is_refused_before_decoding() -> None:
    original = encode(Image.new("L", (20_000, 2)), "PNG")  # 40,000 pixels, one side too long
    with pytest.raises(CompressError) as raised:
        compress(original, 50, 50_000_000)
    assert raised.value.code == "image_too_large"
    assert "20000x2" in raised.value.message


def test_truncated_jpeg_is_a_decode_error() -> None:
    original = jpeg_bytes(640, 480)
    with pytest.raises(CompressError) as raised:
        compress(original[: len(original) // 2], 50, LIMIT)
    assert raised.value.code == "decode_error"


@pytest.mark.parametrize("data", [b"<html>not an image</html>", b"", b"\xff\xd8\xff\xe0garbage"])
def test_non_image_is_a_decode_error(data: bytes) -> None:
    with pytest.raises(CompressError) as raised:
        compress(data, 50, LIMIT)
    assert raised.value.code == "decode_error"
    assert raised.value.message


def test_errors_survive_the_trip_back_from_a_worker_process() -> None:
    error = pickle.loads(pickle.dumps(CompressError("decode_error", "bad bytes")))
    assert (error.code, error.message) == ("decode_error", "bad bytes")


async def test_the_worker_pool_runs_the_same_function() -> None:
    from imgpipe.processor.bootstrap import PoolCompressor

    pool = PoolCompressor(1, LIMIT)
    try:
        await pool.warm_up()
        original = jpeg_bytes(320, 240, quality=95)
        result = await pool(original, 50)
        assert result == compress(original, 50, LIMIT)
        with pytest.raises(CompressError) as raised:
            await pool(b"not an image", 50)
        assert raised.value.code == "decode_error"
    finally:
        pool.shutdown()
