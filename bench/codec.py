"""The codec limit: the processor's own decode + encode, in a process pool, nothing else;
the reference, a hand-written Pillow loop (decode, JPEG quality 50, nothing else) in the
same pool; the outputs' quality against the reference's (mean SSIM against the input);
and what each output format (and `max_side=800`) costs in time and bytes."""

from __future__ import annotations

import importlib
import inspect
import io
import pkgutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from typing import Any

from PIL import Image

QUALITY = 50
FALLBACK = "bench.fallback"
# Modules that start servers or connect on import: never scanned for compress().
SKIP_MODULES = ("app", "main", "bootstrap", "handlers", "consumer")


def find_compress() -> str:
    """`module:function` of the processor's compress step, or FALLBACK when there is none."""
    try:
        package = importlib.import_module("imgpipe.processor")
    except ImportError:
        return FALLBACK
    for info in pkgutil.walk_packages(package.__path__, "imgpipe.processor."):
        if info.name.rsplit(".", 1)[-1] in SKIP_MODULES:
            continue
        try:
            module = importlib.import_module(info.name)
        except Exception:  # noqa: BLE001 - a module that cannot import alone is not the codec
            continue
        if callable(getattr(module, "compress", None)):
            return f"{info.name}:compress"
    return FALLBACK


def _load(target: str) -> Callable[..., Any]:
    if target == FALLBACK:
        return _pillow_compress
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def _pillow_compress(data: bytes, quality: int) -> bytes:
    """Only when the processor has no importable compress(): decode, JPEG encode."""
    image = Image.open(io.BytesIO(data))
    image.load()
    out = io.BytesIO()
    image.convert("RGB").save(out, "JPEG", quality=quality)
    return out.getvalue()


def _options(function: Callable[..., Any]) -> dict[str, Any]:
    """The keyword arguments the processor passes too: the quality and the pixel limit."""
    from imgpipe.contracts.events import Options
    from imgpipe.contracts.settings import Settings

    known = {
        "quality": QUALITY,
        "options": Options(quality=QUALITY),
        "max_pixels": Settings().max_image_pixels,
    }
    parameters = inspect.signature(function).parameters
    return {name: value for name, value in known.items() if name in parameters}


@cache
def _prepared(target: str) -> tuple[Callable[..., Any], dict[str, Any]]:
    function = _load(target)
    return function, _options(function)


def _compress_file(target: str, path: str) -> int:
    """One unit of work, in a pool worker: read the file, run the codec; returns bytes in."""
    function, options = _prepared(target)
    data = Path(path).read_bytes()
    function(data, **options)
    return len(data)


def _encode_file(target: str, choice: dict[str, Any], path: str) -> tuple[int, int]:
    """Like _compress_file with the request options `choice`; returns (bytes in, bytes out)."""
    from imgpipe.contracts.events import Options

    function, options = _prepared(target)
    data = Path(path).read_bytes()
    result = function(data, **(options | {"options": Options(quality=QUALITY, **choice)}))
    return len(data), len(result.data)


def _reference_file(path: str) -> int:
    """The reference's unit of work: what a user would write by hand."""
    data = Path(path).read_bytes()
    _reference_encode(data)
    return len(data)


def _reference_encode(data: bytes) -> bytes:
    image = Image.open(io.BytesIO(data))
    image.load()
    out = io.BytesIO()
    image.save(out, "JPEG", quality=QUALITY)
    return out.getvalue()


def _ssims(target: str, path: str) -> tuple[float, float]:
    """(SSIM of the processor's output, SSIM of the reference's) against the input, on
    luminance, in a pool worker."""
    from skimage.metrics import structural_similarity

    function, options = _prepared(target)
    data = Path(path).read_bytes()
    result = function(data, **options)
    output = result.data if hasattr(result, "data") else result
    original = _luminance(data)
    ours, reference = _luminance(output), _luminance(_reference_encode(data))
    return (
        float(structural_similarity(original, ours, data_range=255)),
        float(structural_similarity(original, reference, data_range=255)),
    )


def _luminance(data: bytes) -> Any:
    import numpy

    return numpy.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=numpy.float64)


def _warm(target: str) -> None:
    _prepared(target)


@dataclass(frozen=True)
class CodecResult:
    function: str
    workers: int
    images: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds

    def combined(self, other: CodecResult) -> CodecResult:
        """Both measurements as one: all their images over all their time."""
        return CodecResult(
            self.function, self.workers, self.images + other.images, self.seconds + other.seconds
        )


REFERENCE = "Pillow decode + JPEG q50 (the reference)"
# Output quality may not drop: the mean SSIM of the outputs stays within this of the
# reference's.
SSIM_TOLERANCE = 0.005


@dataclass(frozen=True)
class Quality:
    images: int
    ssim: float  # the processor's outputs against their inputs, mean
    reference_ssim: float  # the reference's

    @property
    def within_tolerance(self) -> bool:
        return self.ssim >= self.reference_ssim - SSIM_TOLERANCE


# (label, request options, at most this many images). AVIF encodes at ~0.5 s an image
# (libaom): the whole corpus would take minutes, a handful shows its cost well enough.
FORMATS: tuple[tuple[str, dict[str, Any], int | None], ...] = (
    ("jpeg (default)", {"format": "jpeg"}, None),
    ("jpeg progressive", {"format": "jpeg", "progressive": True}, None),
    ("webp", {"format": "webp"}, None),
    ("avif", {"format": "avif"}, 12),
    ("jpeg, max_side=800", {"format": "jpeg", "max_side": 800}, None),
)


@dataclass(frozen=True)
class FormatCost:
    label: str
    options: dict[str, Any]
    images: int
    seconds: float
    bytes_in: int
    bytes_out: int

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds

    @property
    def kib_out_per_image(self) -> float:
        return self.bytes_out / self.images / 1024


@dataclass(frozen=True)
class CodecPool:
    """One process per core, started and warmed: the codec limit and the format costs
    are measured in the same pool, so they compare."""

    pool: ProcessPoolExecutor
    target: str
    workers: int

    def limit(self, files: list[Path], min_images: int = 300) -> CodecResult:
        """Compress the corpus (repeated up to `min_images`) as the processor does."""
        passes = max(1, -(-min_images // len(files)))
        work = [str(path) for path in files] * passes
        started = time.perf_counter()
        list(self.pool.map(partial(_compress_file, self.target), work, chunksize=2))
        seconds = time.perf_counter() - started
        return CodecResult(self.target, self.workers, len(work), seconds)

    def reference(self, files: list[Path], min_images: int = 300) -> CodecResult:
        """The reference over the same work as `limit`: Pillow decode + JPEG q50."""
        passes = max(1, -(-min_images // len(files)))
        work = [str(path) for path in files] * passes
        started = time.perf_counter()
        list(self.pool.map(_reference_file, work, chunksize=2))
        seconds = time.perf_counter() - started
        return CodecResult(REFERENCE, self.workers, len(work), seconds)

    def quality(self, files: list[Path]) -> Quality:
        """Mean SSIM against the input of the processor's outputs and the reference's."""
        pairs = list(self.pool.map(partial(_ssims, self.target), [str(p) for p in files]))
        ours, reference = (sum(column) / len(pairs) for column in zip(*pairs, strict=True))
        return Quality(len(pairs), ours, reference)

    def formats(self, files: list[Path]) -> list[FormatCost]:
        """Each of FORMATS over the corpus; none when the codec takes no request options."""
        if "options" not in _options(_load(self.target)):
            return []
        return [self._format(label, choice, files[:most]) for label, choice, most in FORMATS]

    def _format(self, label: str, choice: dict[str, Any], files: list[Path]) -> FormatCost:
        work = partial(_encode_file, self.target, choice)
        started = time.perf_counter()
        sizes = list(self.pool.map(work, [str(path) for path in files], chunksize=1))
        seconds = time.perf_counter() - started
        bytes_in, bytes_out = (sum(column) for column in zip(*sizes, strict=True))
        return FormatCost(label, choice, len(files), seconds, bytes_in, bytes_out)


@contextmanager
def codec_pool(workers: int) -> Iterator[CodecPool]:
    target = find_compress()
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_warm, [target] * workers))  # start and import before the clock runs
        yield CodecPool(pool, target, workers)


def codec_limit(files: list[Path], workers: int, min_images: int = 300) -> CodecResult:
    """Compress the corpus (repeated up to `min_images`) in a pool of `workers` processes."""
    with codec_pool(workers) as pool:
        return pool.limit(files, min_images)
