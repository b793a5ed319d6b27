"""compress(): what a user sees in the output file."""

from __future__ import annotations

import asyncio
import io
import pickle
from typing import Any

import pytest
from PIL import Image, ImageChops, ImageCms, ImageStat, JpegImagePlugin

from imgpipe.contracts.events import Options
from imgpipe.processor.colour import MAX_ICC_BYTES
from imgpipe.processor.compress import CompressError, compress
from tests.support.images import (
    EXIF_ORIENTATION,
    exif_rotated_jpeg_bytes,
    grey16_png_bytes,
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
    result = compress(original, Options(quality=50), LIMIT)
    output = decode(result.data)
    assert result.format == "jpeg" and output.format == "JPEG"
    assert len(result.data) < len(original)
    assert (result.width, result.height) == output.size == (640, 480)
    assert mean_difference(output, decode(original)) < 8  # still the same picture


def test_lower_quality_gives_smaller_files() -> None:
    original = jpeg_bytes(640, 480, quality=95)
    assert len(compress(original, Options(quality=30), LIMIT).data) < len(
        compress(original, Options(quality=80), LIMIT).data
    )


def test_png_with_alpha_becomes_webp_with_alpha() -> None:
    original = png_with_alpha_bytes(320, 240)
    result = compress(original, Options(quality=50), LIMIT)
    output = decode(result.data)
    assert result.format == "webp" and output.format == "WEBP"
    assert output.mode == "RGBA"
    assert output.getchannel("A").getextrema() == (0, 255)
    assert output.getpixel((0, 0))[3] == 0  # corners stay transparent
    assert output.getpixel((160, 120))[3] == 255
    assert len(result.data) < len(original)


def test_alpha_channel_that_is_fully_opaque_becomes_jpeg() -> None:
    original = encode(photo(200, 100).convert("RGBA"), "PNG")
    result = compress(original, Options(quality=50), LIMIT)
    assert result.format == "jpeg"
    assert decode(result.data).mode == "RGB"


def test_palette_gif_with_transparency_becomes_webp_from_its_first_frame() -> None:
    first = Image.new("P", (60, 40), 1)
    first.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    first.paste(0, (0, 0, 30, 40))
    second = Image.new("P", (60, 40), 1)
    second.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    original = encode(first, "GIF", save_all=True, append_images=[second], transparency=0)
    result = compress(original, Options(quality=50), LIMIT)
    output = decode(result.data)
    assert result.format == "webp"
    assert getattr(output, "n_frames", 1) == 1
    assert output.getpixel((10, 20))[3] == 0  # the first frame's transparent half
    assert output.getpixel((50, 20))[2] > 200  # and its blue half


def test_exif_orientation_is_applied() -> None:
    original = exif_rotated_jpeg_bytes(400, 200)
    result = compress(original, Options(quality=50), LIMIT)
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
        result = compress(original, Options(quality=50), LIMIT)
        assert (result.width, result.height) == decode(result.data).size
        assert decode(result.data).size == decode(original).size


def test_metadata_is_dropped_and_the_output_is_untagged_srgb() -> None:
    icc = srgb_profile()
    exif = Image.Exif()
    exif[0x010F] = "CameraMaker"  # Make
    original = encode(photo(120, 80), "JPEG", quality=95, icc_profile=icc, exif=exif.tobytes())
    output = decode(compress(original, Options(quality=50), LIMIT).data)
    assert "icc_profile" not in output.info  # untagged means sRGB (test_colour.py)
    assert "exif" not in output.info
    assert len(output.getexif()) == 0


@pytest.mark.parametrize("pixels", [1.5, 3.0], ids=["warning-range", "error-range"])
def test_decompression_bomb_is_refused(pixels: float) -> None:
    original = encode(Image.new("L", (1000, 1000)), "PNG")  # tiny file, a million pixels
    with pytest.raises(CompressError) as raised:
        compress(original, Options(quality=50), int(1_000_000 / pixels))
    assert raised.value.code == "image_too_large"


def test_a_side_too_long_for_the_output_is_refused_before_decoding() -> None:
    original = encode(Image.new("L", (20_000, 2)), "PNG")  # 40,000 pixels, one side too long
    with pytest.raises(CompressError) as raised:
        compress(original, Options(quality=50), 50_000_000)
    assert raised.value.code == "image_too_large"
    assert "20000x2" in raised.value.message


def test_truncated_jpeg_is_a_decode_error() -> None:
    original = jpeg_bytes(640, 480)
    with pytest.raises(CompressError) as raised:
        compress(original[: len(original) // 2], Options(quality=50), LIMIT)
    assert raised.value.code == "decode_error"


@pytest.mark.parametrize("data", [b"<html>not an image</html>", b"", b"\xff\xd8\xff\xe0garbage"])
def test_non_image_is_a_decode_error(data: bytes) -> None:
    with pytest.raises(CompressError) as raised:
        compress(data, Options(quality=50), LIMIT)
    assert raised.value.code == "decode_error"
    assert raised.value.message


def test_errors_survive_the_trip_back_from_a_worker_process() -> None:
    error = pickle.loads(pickle.dumps(CompressError("decode_error", "bad bytes")))
    assert (error.code, error.message) == ("decode_error", "bad bytes")


async def test_the_worker_pool_runs_the_same_function() -> None:
    from imgpipe.processor.adapters.pool import PoolCompressor

    pool = PoolCompressor(1, LIMIT)
    try:
        await pool.warm_up()
        original = jpeg_bytes(320, 240, quality=95)
        result = await pool(original, Options())
        assert result == compress(original, Options(quality=50), LIMIT)
        with pytest.raises(CompressError) as raised:
            await pool(b"not an image", Options())
        assert raised.value.code == "decode_error"
    finally:
        await pool.aclose()


def halves(left: int, right: int, width: int = 32, height: int = 16) -> list[list[int]]:
    return [[left] * (width // 2) + [right] * (width // 2) for _ in range(height)]


def deep_grey(mode: str, left: float, right: float) -> Image.Image:
    image = Image.new(mode, (32, 16), left)
    image.paste(right, (16, 0, 32, 16))
    return image


@pytest.mark.parametrize(
    "original",
    [
        grey16_png_bytes(halves(20_000, 65_535)),
        encode(deep_grey("I;16B", 20_000, 65_535), "TIFF"),
        encode(deep_grey("I", 20_000, 65_535), "TIFF"),
    ],
    ids=["png-16-bit", "tiff-16-bit-big-endian", "tiff-32-bit"],
)
def test_deep_grey_is_scaled_to_8_bits_not_clipped(original: bytes) -> None:
    output = decode(compress(original, Options(quality=90), LIMIT).data)
    assert output.mode == "L"
    assert abs(output.getpixel((4, 8)) - 78) <= 2  # 20000 / 257, not clipped to white
    assert output.getpixel((28, 8)) >= 253


@pytest.mark.parametrize(
    ("left", "right", "expected"),
    [(0.25, 1.0, (64, 255)), (-100.0, 300.0, (0, 255))],
    ids=["zero-to-one", "other-range-stretched"],
)
def test_float_grey_is_scaled_to_8_bits(
    left: float, right: float, expected: tuple[int, int]
) -> None:
    output = decode(
        compress(encode(deep_grey("F", left, right), "TIFF"), Options(quality=90), LIMIT).data
    )
    assert output.mode == "L"
    assert abs(output.getpixel((4, 8)) - expected[0]) <= 2
    assert abs(output.getpixel((28, 8)) - expected[1]) <= 2


def test_float_grey_that_is_not_a_number_is_a_decode_error() -> None:
    with pytest.raises(CompressError) as raised:
        compress(encode(deep_grey("F", 0.5, float("inf")), "TIFF"), Options(quality=90), LIMIT)
    assert raised.value.code == "decode_error"
    assert "not numbers" in raised.value.message


def test_16_bit_grey_png_keeps_its_transparent_grey() -> None:
    # 20000 and 20001 are the same 8-bit grey: only the exact 16-bit value is transparent.
    result = compress(
        grey16_png_bytes(halves(20_000, 20_001), transparent=20_000), Options(quality=90), LIMIT
    )
    output = decode(result.data)
    assert result.format == "webp"
    assert output.getpixel((4, 8))[3] == 0
    assert output.getpixel((28, 8))[3] == 255
    assert abs(output.getpixel((28, 8))[0] - 78) <= 2


def progressive_jpeg(width: int, height: int) -> bytes:
    return encode(Image.new("RGB", (width, height), (120, 60, 30)), "JPEG", progressive=True)


def test_jpeg_with_too_many_scans_is_refused_before_decoding() -> None:
    # Every scan is decoded over the whole image: thousands of them take seconds.
    data = progressive_jpeg(512, 512)
    last_scan = data[data.rindex(b"\xff\xda") : -2]
    original = data[:-2] + last_scan * 200 + b"\xff\xd9"
    with pytest.raises(CompressError) as raised:
        compress(original, Options(quality=50), LIMIT)
    assert raised.value.code == "image_too_large"
    assert "210 scans" in raised.value.message


def test_progressive_jpeg_with_a_progressive_thumbnail_is_accepted() -> None:
    data = progressive_jpeg(640, 480)
    thumbnail = progressive_jpeg(160, 120)  # carried in an APP segment, as EXIF does
    segment = b"\xff\xe9" + (len(thumbnail) + 2).to_bytes(2, "big") + thumbnail
    result = compress(data[:2] + segment + data[2:], Options(quality=50), LIMIT)
    assert (result.width, result.height) == (640, 480)


class Spy:
    """Records calls to an Image method, still running the real one."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        self.calls: list[tuple[object, ...]] = []
        real = getattr(Image.Image, name)

        def spy(image: Image.Image, *args: object, **kwargs: object) -> object:
            self.calls.append((image.mode, *args))
            return real(image, *args, **kwargs)

        monkeypatch.setattr(Image.Image, name, spy)


def test_an_upright_image_is_not_copied_on_the_way(monkeypatch: pytest.MonkeyPatch) -> None:
    copies, conversions = Spy(monkeypatch, "copy"), Spy(monkeypatch, "convert")
    compress(jpeg_bytes(320, 240), Options(quality=50), LIMIT)
    compress(png_with_alpha_bytes(320, 240), Options(quality=50), LIMIT)
    assert copies.calls == []
    assert ("RGBA", "RGBA") not in conversions.calls


def quadrants() -> Image.Image:
    image = Image.new("RGB", (64, 48), (220, 30, 30))
    image.paste((30, 200, 60), (32, 0, 64, 24))
    image.paste((40, 60, 220), (0, 24, 32, 48))
    image.paste((240, 220, 40), (32, 24, 64, 48))
    return image


# How each EXIF orientation is stored: the transpose that undoes what a viewer applies.
STORED = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


@pytest.mark.parametrize("orientation", sorted(STORED))
def test_every_exif_orientation_comes_out_upright(orientation: int) -> None:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    stored = quadrants().transpose(STORED[orientation])
    original = encode(stored, "JPEG", quality=95, exif=exif.tobytes())
    output = decode(compress(original, Options(quality=90), LIMIT).data)
    assert output.size == (64, 48)
    assert mean_difference(output, quadrants()) < 8


def with_header(profile: bytes, *, size: int | None = None, signature: bytes = b"acsp") -> bytes:
    declared = len(profile) if size is None else size
    return declared.to_bytes(4, "big") + profile[4:36] + signature + profile[40:]


@pytest.mark.parametrize(
    "profile",
    [
        with_header(srgb_profile() + b"\x00" * MAX_ICC_BYTES),
        with_header(srgb_profile() + b"smuggled", size=len(srgb_profile())),
        with_header(srgb_profile(), signature=b"junk"),
        b"\x00" * 16 + b"RGB " + b"J" * 3_000_000,
    ],
    ids=["too-large", "declared-size-differs", "no-acsp-signature", "junk-that-names-rgb"],
)
def test_oversized_or_malformed_icc_profile_is_dropped(profile: bytes) -> None:
    original = encode(photo(120, 80), "JPEG", quality=95, icc_profile=profile)
    result = compress(original, Options(quality=50), LIMIT)
    assert "icc_profile" not in decode(result.data).info
    assert len(result.data) < 100_000


@pytest.mark.parametrize("progressive", [False, True], ids=["baseline", "progressive"])
def test_jpeg_missing_only_its_end_marker_is_accepted(progressive: bool) -> None:
    original = encode(photo(640, 480), "JPEG", quality=90, progressive=progressive)
    assert original.endswith(b"\xff\xd9")
    output = decode(compress(original[:-2], Options(quality=90), LIMIT).data)
    assert mean_difference(output, decode(original)) < 4


@pytest.mark.parametrize("kept", [0.25, 0.5, 0.9])
def test_jpeg_cut_mid_scan_is_still_a_decode_error(kept: float) -> None:
    original = jpeg_bytes(640, 480)
    with pytest.raises(CompressError) as raised:
        compress(original[: int(len(original) * kept)], Options(quality=50), LIMIT)
    assert raised.value.code == "decode_error"
    assert "truncated" in raised.value.message


def grey_palette() -> Image.Image:
    image = Image.linear_gradient("L").resize((64, 48)).convert("P")
    image.putpalette([value for grey in range(256) for value in (grey, grey, grey)])
    return image


@pytest.mark.parametrize(
    "image",
    [
        Image.linear_gradient("L").resize((64, 48)).convert("1"),
        Image.linear_gradient("L").resize((64, 48)).convert("LA"),
        grey_palette(),
    ],
    ids=["1-bit", "opaque-LA", "grey-palette"],
)
def test_grey_inputs_become_grey_jpegs(image: Image.Image) -> None:
    result = compress(encode(image, "PNG"), Options(quality=50), LIMIT)
    assert result.format == "jpeg"
    assert decode(result.data).mode == "L"


def test_colour_palette_stays_colour() -> None:
    output = decode(
        compress(encode(photo(64, 48).quantize(16), "PNG"), Options(quality=50), LIMIT).data
    )
    assert output.mode == "RGB"


def test_unknown_format_says_what_is_readable() -> None:
    with pytest.raises(CompressError) as raised:
        compress(b"<html>not an image</html>", Options(quality=50), LIMIT)
    assert raised.value.message == (
        "not an image format imgpipe can read (JPEG, PNG, GIF, WebP, BMP, TIFF)"
    )


def test_decompression_bomb_message_quotes_the_size_and_the_real_limit() -> None:
    original = encode(Image.new("L", (1000, 1000)), "PNG")
    with pytest.raises(CompressError) as raised:
        compress(original, Options(quality=50), 300_000)
    assert raised.value.message == "1000x1000 is 1,000,000 pixels, over the limit of 300,000"


@pytest.mark.parametrize("fmt", ["ICO", "PCX", "JPEG2000", "TGA"])
def test_formats_the_downloader_refuses_are_never_decoded(fmt: str) -> None:
    with pytest.raises(CompressError) as raised:
        compress(encode(tiny(16, 12), fmt), Options(quality=50), LIMIT)
    assert raised.value.code == "decode_error"
    assert raised.value.message.startswith("not an image format imgpipe can read")


async def test_a_worker_that_dies_fails_its_own_image_only() -> None:
    """A worker runs one image at a time: its death fails that image, and a new worker
    takes its place."""
    from imgpipe.processor.adapters.pool import PoolCompressor
    from tests.support.crashing import CRASH, compress_or_die

    pool = PoolCompressor(2, LIMIT, function=compress_or_die)
    try:
        innocent = [f"image {i}".encode() for i in range(12)]
        inputs = [*innocent[:6], CRASH, *innocent[6:]]
        results = await asyncio.gather(
            *(pool(d, Options()) for d in inputs), return_exceptions=True
        )
        crashed = results.pop(6)
        assert isinstance(crashed, CompressError) and crashed.code == "decode_error"
        assert [getattr(result, "data", result) for result in results] == innocent
        assert (await pool(b"after", Options())).data == b"after"
    finally:
        await pool.aclose()


async def test_an_image_over_the_time_limit_fails_and_frees_its_worker() -> None:
    from imgpipe.processor.adapters.pool import PoolCompressor
    from tests.support.crashing import STUCK, compress_or_die

    pool = PoolCompressor(2, LIMIT, time_limit=0.5, function=compress_or_die)
    try:
        results = await asyncio.wait_for(
            asyncio.gather(
                pool(STUCK, Options()), pool(b"fine", Options()), return_exceptions=True
            ),
            30,
        )
        stuck, fine = results
        assert isinstance(stuck, CompressError) and "longer than 0.5 s" in stuck.message
        assert getattr(fine, "data", fine) == b"fine"
        assert (await pool(b"after", Options())).data == b"after"
    finally:
        await pool.aclose()


async def test_an_image_given_up_mid_way_does_not_answer_for_the_next() -> None:
    # A job cancelled (a shutdown, a deleted request) while its image is in a worker.
    from imgpipe.processor.adapters.pool import PoolCompressor
    from tests.support.crashing import compress_or_die

    pool = PoolCompressor(1, LIMIT, function=compress_or_die)
    try:
        await pool.warm_up()
        abandoned = asyncio.ensure_future(pool(b"abandoned", Options()))
        await asyncio.sleep(0.02)  # in the worker now
        abandoned.cancel()
        results = await asyncio.wait_for(
            asyncio.gather(*(pool(f"next {i}".encode(), Options()) for i in range(3))), 30
        )
        assert [result.data for result in results] == [b"next 0", b"next 1", b"next 2"]
    finally:
        await pool.aclose()


@pytest.mark.parametrize(
    ("size", "max_side", "expected"),
    [
        ((1600, 1200), 800, (800, 600)),
        ((1000, 333), 300, (300, 100)),
        ((333, 1000), 77, (26, 77)),
        ((640, 480), 640, (640, 480)),
        ((640, 480), 5000, (640, 480)),  # never upscaled
    ],
)
def test_max_side_shrinks_the_longest_side_keeping_the_aspect_ratio(
    size: tuple[int, int], max_side: int, expected: tuple[int, int]
) -> None:
    original = jpeg_bytes(*size, quality=90)
    result = compress(original, Options(max_side=max_side), LIMIT)
    assert (result.width, result.height) == decode(result.data).size == expected
    width, height = size
    assert abs(expected[0] - expected[1] * width / height) <= 1


def test_a_large_reduction_of_a_jpeg_decodes_it_at_reduced_size(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    drafts: list[tuple[int, int]] = []
    real = JpegImagePlugin.JpegImageFile.draft

    def draft(image: JpegImagePlugin.JpegImageFile, *args: Any) -> object:
        result = real(image, *args)
        drafts.append(image.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", draft)
    original = jpeg_bytes(1600, 1200, quality=90)
    output = decode(compress(original, Options(quality=90, max_side=200), LIMIT).data)
    assert drafts == [(200, 150)]  # decoded at 1/8 scale: 1/64 of the pixels
    assert output.size == (200, 150)
    exact = decode(original).resize((200, 150), Image.Resampling.LANCZOS)
    assert mean_difference(output, exact) < 6  # the same picture as a full decode gives


def test_max_side_applies_to_the_upright_image() -> None:
    original = exif_rotated_jpeg_bytes(400, 200)  # shown as 200x400
    result = compress(original, Options(max_side=100), LIMIT)
    assert (result.width, result.height) == decode(result.data).size == (50, 100)


def test_max_side_shrinks_a_transparent_png_keeping_its_alpha() -> None:
    result = compress(png_with_alpha_bytes(320, 240), Options(max_side=160), LIMIT)
    output = decode(result.data)
    assert result.format == "webp" and output.size == (160, 120)
    assert output.getpixel((0, 0))[3] == 0 and output.getpixel((80, 60))[3] == 255


@pytest.mark.parametrize(("fmt", "pillow"), [("jpeg", "JPEG"), ("webp", "WEBP"), ("avif", "AVIF")])
def test_the_format_asked_for_is_the_format_made(fmt: str, pillow: str) -> None:
    for original in (jpeg_bytes(160, 120), png_with_alpha_bytes(160, 120)):
        result = compress(original, Options(format=fmt), LIMIT)  # type: ignore[arg-type]
        output = decode(result.data)
        assert result.format == fmt and output.format == pillow
        assert output.size == (160, 120)


def test_transparency_asked_as_jpeg_is_laid_on_white() -> None:
    output = decode(compress(png_with_alpha_bytes(320, 240), Options(format="jpeg"), LIMIT).data)
    assert output.mode == "RGB"
    assert min(output.getpixel((1, 1))) > 240  # a see-through corner


def test_grey_stays_grey_in_avif() -> None:
    grey = encode(Image.linear_gradient("L").resize((64, 48)), "PNG")
    assert decode(compress(grey, Options(format="avif"), LIMIT).data).mode == "L"


def test_progressive_jpeg_on_request() -> None:
    original = jpeg_bytes(320, 240)
    assert not decode(compress(original, Options(), LIMIT).data).info.get("progressive")
    output = decode(compress(original, Options(progressive=True), LIMIT).data)
    assert output.info.get("progressive")


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_a_plain_jpeg_comes_out_as_pillow_would_make_it(mode: str) -> None:
    # The common case goes straight through libjpeg-turbo; a user must not see it.
    original = encode(photo(640, 480).convert(mode), "JPEG", quality=95)
    by_pillow = encode(decode(original), "JPEG", quality=50)
    result = compress(original, Options(quality=50), LIMIT)
    output = decode(result.data)
    assert (output.mode, output.size) == (mode, (640, 480))
    assert (result.width, result.height) == (640, 480)
    assert mean_difference(output, decode(by_pillow)) < 1
    assert 0.97 < len(result.data) / len(by_pillow) < 1.03
    if mode == "RGB":
        assert JpegImagePlugin.get_sampling(output) == 2  # 4:2:0, as Pillow encodes it


def test_a_jpeg_libjpeg_warns_about_still_comes_out() -> None:
    # Bytes between the last scan and the end marker: libjpeg-turbo warns ("extraneous
    # bytes before marker"), browsers show the picture, and so does imgpipe.
    original = encode(photo(320, 240), "JPEG", quality=90)
    damaged = original[:-2] + b"\x00\x01junk" + original[-2:]
    result = compress(damaged, Options(quality=50), LIMIT)
    assert (result.format, result.width, result.height) == ("jpeg", 320, 240)
    assert mean_difference(decode(result.data), decode(original)) < 8
