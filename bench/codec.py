"""The codec limit: the processor's own decode + encode, in a process pool, nothing else."""

from __future__ import annotations

import importlib
import inspect
import io
import pkgutil
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
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


def codec_limit(files: list[Path], workers: int, min_images: int = 300) -> CodecResult:
    """Compress the corpus (repeated up to `min_images`) in a pool of `workers` processes."""
    target = find_compress()
    passes = max(1, -(-min_images // len(files)))
    work = [str(path) for path in files] * passes
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_warm, [target] * workers))  # start and import before the clock runs
        started = time.perf_counter()
        list(pool.map(partial(_compress_file, target), work, chunksize=2))
        seconds = time.perf_counter() - started
    return CodecResult(target, workers, len(work), seconds)
