"""Decode and re-encode one image: a pure function, run in a process pool (DESIGN.md, "Images").

Opaque images become JPEG, images with real transparency become WebP, both at the
request's quality. EXIF orientation is applied, the ICC profile kept, all other
metadata dropped, and nothing is ever upscaled (nothing is resized at all).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Literal

from PIL import Image, ImageOps

OutputFormat = Literal["jpeg", "webp"]

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
# ICC header bytes 16..20 name the profile's colour space; keep it only if it matches the output.
_ICC_SPACE = {"RGB": b"RGB ", "RGBA": b"RGB ", "L": b"GRAY", "CMYK": b"CMYK"}
_JPEG_MODES = {"RGB", "L", "CMYK"}
# The largest side WebP can hold; a longer side is refused before any pixel is decoded.
MAX_SIDE = 16_383


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


def compress(data: bytes, quality: int, max_pixels: int) -> Compressed:
    """Re-encode `data` at `quality` (1-95); raises CompressError for bad or oversized input."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x the limit: treat that as a bomb too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as source:
                _check_sides(source)
                # Only the first frame is ever decoded, however many an animation holds.
                image = _prepare(source)
            return _encode(image, quality)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise CompressError("image_too_large", str(exc)) from None
    except CompressError:
        raise
    except MemoryError:
        raise CompressError("image_too_large", "not enough memory to decode the image") from None
    except Exception as exc:  # Pillow raises many types for malformed input
        raise CompressError("decode_error", f"cannot decode image: {exc}") from None


def _check_sides(source: Image.Image) -> None:
    width, height = source.size
    if max(width, height) > MAX_SIDE:
        raise CompressError(
            "image_too_large", f"{width}x{height} has a side longer than {MAX_SIDE} pixels"
        )


def _prepare(source: Image.Image) -> Image.Image:
    """Decode the first frame upright; returns an image in RGB, RGBA, L or CMYK."""
    source.load()
    icc = source.info.get("icc_profile")
    image = ImageOps.exif_transpose(source) or source
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        image = image.convert("RGBA")
        alpha_min, _ = image.getchannel("A").getextrema()
        if alpha_min == 255:  # an alpha channel that hides nothing: opaque after all
            image = image.convert("RGB")
    elif image.mode not in _JPEG_MODES:
        image = image.convert("RGB")
    # Drop every piece of metadata but the ICC profile (and only one that fits the pixels).
    image.info = {}
    if isinstance(icc, bytes) and icc[16:20] == _ICC_SPACE.get(image.mode):
        image.info["icc_profile"] = icc
    return image


def _encode(image: Image.Image, quality: int) -> Compressed:
    buffer = io.BytesIO()
    icc = image.info.get("icc_profile")
    extra = {"icc_profile": icc} if icc else {}
    if image.mode == "RGBA":
        image.save(buffer, "WEBP", quality=quality, **extra)
        fmt: OutputFormat = "webp"
    else:
        image.save(buffer, "JPEG", quality=quality, optimize=False, **extra)
        fmt = "jpeg"
    width, height = image.size
    return Compressed(buffer.getvalue(), fmt, width, height)
