"""Pixels into sRGB, the one colour space every browser, CDN and screen assumes.

An image's embedded ICC profile says what its numbers mean; LittleCMS (Pillow's
ImageCms) turns them into sRGB, and the output carries no profile, since untagged
pixels are read as sRGB everywhere (a profile would cost 588 bytes or more per image).
Grey stays grey: its profile's tone curve is converted to sRGB's.

CMYK without a profile goes through Pillow's built-in conversion (ink coverage
subtracted from white). A press profile would be closer to what the file shows in a
print tool, but the only CMYK profile in Debian or on PyPI, Artifex's SWOP profile in
Ghostscript, is AGPL-licensed: shipping it would put that licence on the package.
"""

from __future__ import annotations

import io
from functools import lru_cache

from PIL import Image, ImageCms

# ICC header bytes 16..20 name the profile's colour space; it must fit the pixels.
_ICC_SPACE = {"RGB": b"RGB ", "RGBA": b"RGB ", "L": b"GRAY", "CMYK": b"CMYK"}
# Display profiles are a few KB, camera and press profiles a few hundred: anything larger
# is bloat at best and a way to smuggle data past "all other metadata dropped" at worst.
MAX_ICC_BYTES = 1 << 20
# Relative colorimetric keeps in-gamut colours exact; black point compensation maps a
# press profile's black (ink on paper, L* 10 to 20) to the screen's, as Photoshop does.
_INTENT = ImageCms.Intent.RELATIVE_COLORIMETRIC
_FLAGS = ImageCms.Flags.BLACKPOINTCOMPENSATION
_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def to_srgb(image: Image.Image, icc: object) -> Image.Image:
    """`image` (RGB, RGBA, L or CMYK) as sRGB pixels: RGB, RGBA or L, with no profile.

    A profile that is malformed, oversized, for other pixels or that LittleCMS refuses
    is ignored: the pixels are taken as sRGB (CMYK: converted without a profile)."""
    profile = icc if _is_well_formed(icc, image.mode) else None
    transform = _transform(profile, image.mode) if isinstance(profile, bytes) else None
    if transform is not None:
        # L goes through RGB: its neutral greys come out neutral, and back to one band.
        out = ImageCms.applyTransform(image, transform)
        assert out is not None  # only None when applied in place
        image = out.convert("L") if image.mode == "L" else out
    elif image.mode == "CMYK":
        image = image.convert("RGB")
    image.info.pop("icc_profile", None)
    return image


def is_srgb_already(icc: object, mode: str) -> bool:
    """Whether to_srgb leaves these pixels as they are because they are sRGB: RGB or L
    without a profile, or RGB with a readable sRGB one. A profile it ignores as unusable
    is not sRGB here: a browser may still honour it."""
    if mode not in ("RGB", "L"):
        return False  # CMYK is converted; alpha is not what this is asked about
    if icc is None:
        return True
    return isinstance(icc, bytes) and _is_well_formed(icc, mode) and _reads_as_srgb(icc)


@lru_cache(maxsize=16)
def _reads_as_srgb(icc: bytes) -> bool:
    try:
        return _is_srgb(ImageCms.ImageCmsProfile(io.BytesIO(icc)))
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return False


def _is_well_formed(icc: object, mode: str) -> bool:
    """Small, with a well-formed header (declared size, "acsp" signature), for these pixels."""
    return (
        isinstance(icc, bytes)
        and len(icc) <= MAX_ICC_BYTES
        and int.from_bytes(icc[:4], "big") == len(icc)
        and icc[36:40] == b"acsp"
        and icc[16:20] == _ICC_SPACE.get(mode)
    )


@lru_cache(maxsize=16)  # catalogues repeat a handful of profiles; a transform costs ~1 ms
def _transform(icc: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
    """The transform from `icc` to sRGB; None when the profile is sRGB already (nothing
    to do) or LittleCMS cannot use it."""
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if _is_srgb(profile):
            return None
        out_mode = "RGBA" if mode == "RGBA" else "RGB"
        return ImageCms.buildTransform(
            profile, _SRGB, mode, out_mode, renderingIntent=_INTENT, flags=_FLAGS
        )
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return None


def _is_srgb(profile: ImageCms.ImageCmsProfile) -> bool:
    # Cameras, phones and Photoshop name theirs "sRGB IEC61966-2.1" and the like.
    description = (profile.profile.profile_description or "").strip()
    return profile.profile.xcolor_space == "RGB " and description.startswith("sRGB")
