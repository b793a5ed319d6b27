"""Decode and re-encode one image: a pure function, run in a process pool.

The request's options choose the output: `format` auto makes opaque images JPEG and
images with real transparency WebP; `max_side` shrinks the longest side (never
enlarges it); `quality` and `progressive` go to the encoder. EXIF orientation is
applied, colours are converted to sRGB (colour.py), all other metadata is dropped.

JPEG in and JPEG out with nothing else to change (upright, sRGB or grey, not resized,
baseline asked) goes straight through libjpeg-turbo (simplejpeg): no Pillow image is
made, which saves about an eighth of the codec's CPU. Everything else, damaged files
included, takes Pillow's path.

Never worse than the input: a JPEG that needed no change at all (JPEG out, sRGB,
upright, not resized, as progressive as asked) whose encode came out larger than it is
kept as it came, its metadata stripped (jpeg_metadata.py), when that is smaller still.
"""

from __future__ import annotations

import io
import math
import signal
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, cast

from PIL import Image, ImageFile, ImageMath, ImageOps

from imgpipe.contracts.events import Options
from imgpipe.processor.colour import is_srgb_already, to_srgb
from imgpipe.processor.jpeg_metadata import strip_metadata

OutputFormat = Literal["jpeg", "webp", "avif"]

# The formats the download sniffer lets through: no other decoder may ever run.
_READABLE_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP")
_UNREADABLE = "not an image format imgpipe can read (JPEG, PNG, GIF, WebP, BMP, TIFF)"
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_JPEG_MODES = {"RGB", "L", "CMYK"}
# The largest side WebP can hold; a longer side is refused before any pixel is decoded.
MAX_SIDE = 16_383
_EXIF_ORIENTATION = 0x0112
_SIDEWAYS = {5, 6, 7, 8}  # orientations that swap width and height
_JPEG_START, _JPEG_END, _JPEG_SCAN = b"\xff\xd8", b"\xff\xd9", b"\xff\xda"
# A progressive JPEG has ~10 scans (18 for CMYK), an EXIF thumbnail or an MPO's second
# picture a few more each; libjpeg decodes every scan over the whole image.
MAX_JPEG_SCANS = 64
# libjpeg gives every 8x8 block it never received luma 128 (C and K 127 in Adobe CMYK);
# the slack covers rounding in the conversion back to luma.
_DECODER_FILL = range(127, 130)
# Modes the direct path takes: simplejpeg's colour space and chroma subsampling for
# each (4:2:0 is what Pillow's encoder uses for colour at every quality below 90).
_DIRECT = {"RGB": ("RGB", "420"), "L": ("GRAY", "Gray")}


class CompressError(Exception):
    """An image that cannot be turned into output; `code` goes into ImageProcessed.error."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)  # both in args, so it survives pickling from the pool
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Compressed:
    data: bytes
    format: OutputFormat
    width: int
    height: int
    # True when `data` is the input itself, minus its metadata, not an encode.
    kept_input: bool = False


def within_time(
    seconds: float, function: Callable[[bytes, Options, int], Compressed], *args: Any
) -> Compressed:
    """Run `function` in a pool worker that dies if it takes longer than `seconds`:
    SIGALRM's default action ends the process, which no decoder stuck in C can put off.
    The pool sees a dead worker, as after a crash (adapters.pool.PoolCompressor)."""
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return function(*args)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def compress(data: bytes, options: Options, max_pixels: int) -> Compressed:
    """Re-encode `data` as `options` ask; raises CompressError for bad or oversized input."""
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x the limit: treat that as a bomb too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            direct = _directly(data, options, max_pixels)
            if direct is not None:
                return _smaller_of(direct, data)  # the input needed no change either
            image, as_is = _decode(data, max_pixels, options)
        encoded = _encode(image, options)
        return _smaller_of(encoded, data) if as_is and encoded.format == "jpeg" else encoded
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Raised by a decoder mid-way (a TIFF's tiles, say); Pillow's text quotes twice the limit.
        message = f"decoding needs more than the limit of {max_pixels:,} pixels"
        raise CompressError("image_too_large", message) from None
    except CompressError:
        raise
    except Image.UnidentifiedImageError:  # its text names the BytesIO and its address
        raise CompressError("decode_error", _UNREADABLE) from None
    except MemoryError:
        raise CompressError("image_too_large", "not enough memory to decode the image") from None
    except Exception as exc:  # Pillow raises many types for malformed input
        raise CompressError("decode_error", f"cannot decode image: {exc}") from None


def _directly(data: bytes, options: Options, max_pixels: int) -> Compressed | None:
    """A whole JPEG whose pixels need no change, re-encoded by libjpeg-turbo straight
    from its bytes, with the guards of the Pillow path; None when anything else is asked
    or found (or libjpeg warns of damage), and the Pillow path does it all."""
    if options.format not in ("auto", "jpeg") or options.progressive:
        return None
    if not data.startswith(_JPEG_START) or not data.rstrip(b"\x00").endswith(_JPEG_END):
        return None
    _check_scan_count(data)
    with _open(data, max_pixels) as source:  # reads the headers, not the pixels
        _check_size(source, max_pixels)
        if source.format != "JPEG" or source.mode not in _DIRECT:
            return None  # an MPO, CMYK
        if _fitted(source.size, options.max_side) != source.size:
            return None  # draft's scaled decode and Lanczos
        if source.getexif().get(_EXIF_ORIENTATION) not in (None, 1):
            return None
        if not is_srgb_already(source.info.get("icc_profile"), source.mode):
            return None
        colour_space, subsampling = _DIRECT[source.mode]
    # Imported here: the processor's own process imports this module too, and simplejpeg
    # brings numpy (14 MiB); its workers have it from the forkserver's preload.
    import simplejpeg

    try:
        # strict (the default): libjpeg's warnings of a damaged file raise ValueError.
        pixels = simplejpeg.decode_jpeg(data, colorspace=colour_space)
        encoded = simplejpeg.encode_jpeg(
            pixels, quality=options.quality, colorspace=colour_space, colorsubsampling=subsampling
        )
    except ValueError:
        return None
    height, width = pixels.shape[:2]
    return Compressed(encoded, "jpeg", width, height)


def _decode(data: bytes, max_pixels: int, options: Options) -> tuple[Image.Image, bool]:
    """The first frame, upright, no longer than `max_side`, in sRGB as RGB, RGBA or L;
    checked before any pixel is decoded. The flag: the input is a whole JPEG whose
    pixels needed no change and that is as progressive as asked."""
    end_added = False
    if data.startswith(_JPEG_START):
        _check_scan_count(data)
        # Browsers show a JPEG that lacks only its end marker; Pillow calls it truncated.
        # (Zero padding after the marker is common and harmless.)
        if not data.rstrip(b"\x00").endswith(_JPEG_END):
            data, end_added = data + _JPEG_END, True
    with _open(data, max_pixels) as source:
        _check_size(source, max_pixels)
        size = _fitted(source.size, options.max_side)
        resized = size != source.size  # asked here: draft shrinks source.size
        if resized and source.format == "JPEG":
            # libjpeg decodes at 1/2, 1/4 or 1/8 scale, no smaller than asked: a large
            # reduction costs a fraction of a full decode; resampling does the rest.
            source.draft(source.mode, size)
        # Only the first frame is ever decoded, however many an animation holds.
        source.load()
        if end_added:
            _check_not_cut_short(source)
        # Read before _prepare, which drops the metadata.
        fits = source.format == "JPEG" and not end_added and not resized
        fits = fits and (not options.progressive or bool(source.info.get("progressive")))
        image, unchanged = _prepare(source, size)
        return image, fits and unchanged


def _fitted(size: tuple[int, int], max_side: int | None) -> tuple[int, int]:
    """`size` shrunk so that its longest side is `max_side`, never enlarged; the other
    side is rounded, so the aspect ratio is kept within one pixel."""
    width, height = size
    if max_side is None or max(width, height) <= max_side:
        return size
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _check_scan_count(data: bytes) -> None:
    # A small file can repeat one scan thousands of times: seconds of CPU for one image.
    # 0xFFDA never occurs in entropy-coded data, so counting bytes errs only towards more.
    scans = data.count(_JPEG_SCAN)
    if scans > MAX_JPEG_SCANS:
        raise CompressError(
            "image_too_large",
            f"the JPEG has {scans} scans, more than the {MAX_JPEG_SCANS} any real image needs;"
            " decoding them all would take too long",
        )


def _open(data: bytes, max_pixels: int) -> ImageFile.ImageFile:
    # Pillow's check at open quotes twice the limit and no size; _check_size does both.
    Image.MAX_IMAGE_PIXELS = None
    try:
        return Image.open(io.BytesIO(data), formats=_READABLE_FORMATS)
    finally:
        Image.MAX_IMAGE_PIXELS = max_pixels  # still guards sizes found while decoding


def _check_size(source: Image.Image, max_pixels: int) -> None:
    width, height = source.size
    if max(width, height) > MAX_SIDE:
        raise CompressError(
            "image_too_large", f"{width}x{height} has a side longer than {MAX_SIDE} pixels"
        )
    if width * height > max_pixels:
        raise CompressError(
            "image_too_large",
            f"{width}x{height} is {width * height:,} pixels, over the limit of {max_pixels:,}",
        )


def _check_not_cut_short(source: Image.Image) -> None:
    """With its end marker added, a JPEG cut mid-scan decodes too, its missing blocks grey.

    Only a cut well before the end shows in the last block: one in the last few blocks, or
    in a progressive JPEG's later scans, passes as a little damage, as a browser shows it."""
    width, height = source.size
    last_block = source.crop(((width - 1) // 8 * 8, (height - 1) // 8 * 8, width, height))
    for band in _unblended_bands(last_block):
        low, high = band.getextrema()
        if low in _DECODER_FILL and high in _DECODER_FILL:
            message = "the JPEG is truncated: its last pixels are missing"
            raise CompressError("decode_error", message)


def _unblended_bands(block: Image.Image) -> list[Image.Image]:
    # Subsampled bands are upsampled, which blends in the colour of the block before.
    if block.mode == "CMYK":
        return [block.getchannel("C"), block.getchannel("K")]
    return [block.convert("L")]  # luma, as the JPEG stored it, give or take rounding


def _prepare(source: Image.Image, size: tuple[int, int]) -> tuple[Image.Image, bool]:
    """The image ready to encode, and whether turning and colour left its pixels alone."""
    icc = source.info.get("icc_profile")
    orientation = source.getexif().get(_EXIF_ORIENTATION)
    transposed = orientation in _SIDEWAYS
    # RGB and L pass _to_output_mode as they are; to_srgb leaves sRGB alone.
    unchanged = orientation in (None, 1) and is_srgb_already(icc, source.mode)
    # In place: no copy of the whole image when there is no orientation to apply.
    ImageOps.exif_transpose(source, in_place=True)
    image = _to_output_mode(source)
    if transposed:
        size = size[::-1]
    if image.size != size:
        # Lanczos over the few pixels draft left; Pillow resamples alpha premultiplied.
        image = image.resize(size, Image.Resampling.LANCZOS)
    # Every piece of metadata is dropped; the profile is used up converting to sRGB.
    image.info = {}
    return to_srgb(image, icc), unchanged


def _to_output_mode(image: Image.Image) -> Image.Image:
    if image.mode == "I" or image.mode.startswith("I;16"):
        return _deep_grey_to_8_bits(image)
    if image.mode == "F":
        return _float_grey_to_8_bits(image)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        return _alpha_only_if_used(image)
    if image.mode == "1" or _is_grey_palette(image):
        return image.convert("L")  # a grey JPEG: a third of the samples of an RGB one
    if image.mode not in _JPEG_MODES:
        return image.convert("RGB")
    return image


def _alpha_only_if_used(image: Image.Image) -> Image.Image:
    """RGBA (for WebP) when some pixel is see-through; otherwise L or RGB, without alpha."""
    with_alpha = "LA" if image.mode in ("L", "LA") else "RGBA"  # grey stays grey if opaque
    image = image if image.mode == with_alpha else image.convert(with_alpha)
    if _is_opaque(image.getchannel("A")):
        return image.convert(with_alpha[:-1])
    return image if image.mode == "RGBA" else image.convert("RGBA")


def _is_opaque(alpha: Image.Image) -> bool:
    alpha_min, _ = alpha.getextrema()
    return alpha_min == 255


def _is_grey_palette(image: Image.Image) -> bool:
    # Only without a profile: a palette's profile is RGB and would not fit grey output.
    if image.mode != "P" or "icc_profile" in image.info:
        return False
    palette = image.getpalette("RGB") or []
    used = cast(list[tuple[int, int]], image.getcolors(256) or [])  # (count, index)
    return all(len(set(palette[3 * index : 3 * index + 3])) == 1 for _, index in used)


def _deep_grey_to_8_bits(image: Image.Image) -> Image.Image:
    """16- and 32-bit grey, scaled: convert("L") would clip everything above 255 to white."""
    wide = image if image.mode in ("I", "I;16") else image.convert("I")
    grey = wide.point(lambda value: value * (1 / 257) + 0.5).convert("L")
    transparent = image.info.get("transparency")
    if not isinstance(transparent, int):
        return grey
    # PNG's tRNS names one 16-bit grey: compare before scaling, where 257 greys become one.
    opaque = ImageMath.lambda_eval(
        lambda args: args["notequal"](args["image"], transparent) * 255, image=image.convert("I")
    )
    return _alpha_only_if_used(Image.merge("LA", (grey, opaque.convert("L"))))


def _float_grey_to_8_bits(image: Image.Image) -> Image.Image:
    """Float grey is usually 0..1; any other range has no scale but its own, so it is
    stretched from its darkest to its brightest pixel (a flat image becomes black)."""
    low, high = cast(tuple[float, float], image.getextrema())  # one band
    if not (math.isfinite(low) and math.isfinite(high)):
        raise CompressError(
            "decode_error", "the image has floating-point pixels that are not numbers"
        )
    if low >= 0 and high <= 1:
        low, high = 0.0, 1.0
    scale = 255 / (high - low) if high > low else 0.0
    return image.point(lambda value: (value - low) * scale + 0.5).convert("L")


def _encode(image: Image.Image, options: Options) -> Compressed:
    fmt = _output_format(image, options.format)
    buffer = io.BytesIO()
    if fmt == "jpeg":
        if image.mode == "RGBA":  # JPEG has no alpha: see-through parts become white
            image = _on_white(image)
        # Optimized Huffman tables save 10% of the bytes on the bench corpus but nearly
        # double the codec's CPU (README, "Output"); progressive JPEG always has them.
        image.save(
            buffer,
            "JPEG",
            quality=options.quality,
            optimize=False,
            progressive=options.progressive,
        )
    elif fmt == "webp":
        image.save(buffer, "WEBP", quality=options.quality)
    else:
        image.save(buffer, "AVIF", quality=options.quality)
    width, height = image.size
    return Compressed(buffer.getvalue(), fmt, width, height)


def _smaller_of(encoded: Compressed, data: bytes) -> Compressed:
    """The input stripped of metadata when the encode is larger than the input and the
    stripped input is smaller than the encode; otherwise the encode."""
    if len(encoded.data) <= len(data):
        return encoded
    stripped = strip_metadata(data)
    if stripped is None or len(stripped) >= len(encoded.data):
        return encoded  # a JPEG the segment walk cannot follow is not kept
    return Compressed(stripped, "jpeg", encoded.width, encoded.height, kept_input=True)


def _output_format(image: Image.Image, asked: str) -> OutputFormat:
    if asked == "auto":  # JPEG is smaller for opaque photos; WebP keeps transparency
        return "webp" if image.mode == "RGBA" else "jpeg"
    return cast(OutputFormat, asked)


def _on_white(image: Image.Image) -> Image.Image:
    background = Image.new("RGB", image.size, (255, 255, 255))
    background.paste(image, mask=image.getchannel("A"))
    return background
