"""Deterministic test images: photo-like JPEGs, PNGs with alpha, EXIF-rotated files."""

from __future__ import annotations

import io
import random
import struct
import zlib

from PIL import Image, ImageDraw, ImageFilter

EXIF_ORIENTATION = 0x0112


def photo(width: int = 640, height: int = 480, seed: int = 0) -> Image.Image:
    """A noisy, blurred, colourful picture: compresses like a photo, not like a flat fill."""
    rng = random.Random(seed)
    image = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(40):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        box = (x0, y0, x0 + rng.randrange(20, width // 2), y0 + rng.randrange(20, height // 2))
        draw.ellipse(box, fill=tuple(rng.randrange(256) for _ in range(3)))
    noise = Image.effect_noise((width, height), 40).convert("RGB")
    return Image.blend(image, noise, 0.25).filter(ImageFilter.GaussianBlur(1))


def jpeg_bytes(width: int = 640, height: int = 480, seed: int = 0, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    photo(width, height, seed).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def png_with_alpha_bytes(width: int = 320, height: int = 240, seed: int = 0) -> bytes:
    image = photo(width, height, seed).convert("RGBA")
    alpha = Image.new("L", (width, height), 0)
    ImageDraw.Draw(alpha).ellipse((0, 0, width, height), fill=255)
    image.putalpha(alpha)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def exif_rotated_jpeg_bytes(width: int = 400, height: int = 200, seed: int = 0) -> bytes:
    """Stored as width x height with orientation 6: viewers show it as height x width."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    buffer = io.BytesIO()
    photo(width, height, seed).save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


def grey16_png_bytes(rows: list[list[int]], transparent: int | None = None) -> bytes:
    """A 16-bit greyscale PNG, optionally with a tRNS chunk naming one grey as transparent.

    Written by hand: Pillow cannot save tRNS for 16-bit grey."""
    height, width = len(rows), len(rows[0])
    raw = b"".join(b"\x00" + struct.pack(f">{width}H", *row) for row in rows)
    chunks = [(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0))]
    if transparent is not None:
        chunks.append((b"tRNS", struct.pack(">H", transparent)))
    chunks += [(b"IDAT", zlib.compress(raw)), (b"IEND", b"")]
    return b"\x89PNG\r\n\x1a\n" + b"".join(_png_chunk(kind, body) for kind, body in chunks)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
