"""The benchmark corpus: deterministic photo-like JPEGs, their CSVs, and a loopback server."""

from __future__ import annotations

import csv
import io
import json
import random
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from socketserver import BaseRequestHandler
from typing import BinaryIO

from PIL import Image, ImageDraw, ImageFilter

GENERATOR_VERSION = 1  # bump when photo() changes, so cached corpora are rebuilt
WIDTH, HEIGHT, QUALITY = 1600, 1200, 90
URLS_PER_ROW = 3


def photo(width: int, height: int, seed: int) -> Image.Image:
    """Shapes, soft gradients and grain: compresses like a photo, not like a flat fill.

    Every random value comes from one seeded generator (Pillow's effect_noise is not
    seedable), so the same seed always gives the same pixels.
    """
    rng = random.Random(seed)
    image = _gradient(width, height, rng)
    draw = ImageDraw.Draw(image)
    for _ in range(60):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        box = (x0, y0, x0 + rng.randrange(40, width // 2), y0 + rng.randrange(40, height // 2))
        colour = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.6 else draw.rectangle)(box, fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(3))
    half = (width // 2, height // 2)
    grain = Image.frombytes("RGB", half, rng.randbytes(half[0] * half[1] * 3))
    grain = grain.resize((width, height), Image.Resampling.BILINEAR)
    return Image.blend(image, grain, 0.2)


def _gradient(width: int, height: int, rng: random.Random) -> Image.Image:
    start = [rng.randrange(256) for _ in range(3)]
    end = [rng.randrange(256) for _ in range(3)]
    column = Image.new("RGB", (1, 256))
    pairs = list(zip(start, end, strict=True))
    column.putdata([tuple(s + (e - s) * y // 255 for s, e in pairs) for y in range(256)])
    return column.resize((width, height), Image.Resampling.BILINEAR)


def _write_photo(directory: Path, index: int) -> int:
    buffer = io.BytesIO()
    photo(WIDTH, HEIGHT, seed=index).save(buffer, "JPEG", quality=QUALITY)
    (directory / file_name(index)).write_bytes(buffer.getvalue())
    return len(buffer.getvalue())


def file_name(index: int) -> str:
    return f"img-{index:04d}.jpg"


@dataclass(frozen=True)
class Corpus:
    directory: Path
    files: list[Path]

    @property
    def names(self) -> list[str]:
        return [path.name for path in self.files]

    @property
    def total_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.files)


def build_corpus(out_dir: Path, count: int, workers: int) -> Corpus:
    """Generate `count` JPEGs once (process pool); later runs reuse the cached files."""
    directory = out_dir / f"corpus-v{GENERATOR_VERSION}-{WIDTH}x{HEIGHT}-q{QUALITY}"
    directory.mkdir(parents=True, exist_ok=True)
    manifest = directory / "manifest.json"
    done: set[int] = set(json.loads(manifest.read_text())) if manifest.exists() else set()
    missing = [i for i in range(count) if i not in done or not (directory / file_name(i)).exists()]
    if missing:
        print(f"corpus: generating {len(missing)} images in {directory} ({workers} processes)")
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(partial(_write_photo, directory), missing, chunksize=4))
        manifest.write_text(json.dumps(sorted(done | set(missing))))
    return Corpus(directory, [directory / file_name(i) for i in range(count)])


def image_urls(base_url: str, names: list[str], count: int, tag: str) -> Iterator[str]:
    """`count` distinct URLs cycling over the corpus files (`?v=` makes each one unique)."""
    for i in range(count):
        yield f"{base_url}/{names[i % len(names)]}?v={tag}-{i}"


def write_csv(path: Path, urls: list[str], per_row: int = URLS_PER_ROW) -> int:
    """The upload format: `S. No.`, `Product Name`, `Input Image Urls`; returns the row count."""
    rows = [urls[i : i + per_row] for i in range(0, len(urls), per_row)]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["S. No.", "Product Name", "Input Image Urls"])
        for number, row in enumerate(rows, start=1):
            writer.writerow([number, f"Bench product {number}", ",".join(row)])
    return len(rows)


class _Handler(SimpleHTTPRequestHandler):
    """Serves like a CDN, cheaply: keep-alive and zero-copy bodies.

    HTTP/1.1 keeps connections open (the base class sends Content-Length), so the
    processor's pool reuses them instead of paying a connect per image. Headers go out
    in one write, then `socket.sendfile` (os.sendfile; plain sends for in-memory bodies
    such as directory listings) copies the file without passing it through Python.
    """

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # the body's last segment must not wait for an ACK
    timeout = 60  # seconds an idle keep-alive connection (and its thread) may live

    def copyfile(self, source: BinaryIO, outputfile: BinaryIO) -> None:  # type: ignore[override]
        self.connection.sendfile(source)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def serve(directory: Path) -> Iterator[str]:
    """Serve `directory` on 127.0.0.1 (a free port); yields the base URL."""
    with loopback(partial(_Handler, directory=str(directory))) as base_url:
        yield base_url


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default backlog is 5: the processor opening a few dozen connections
    # at once had SYNs dropped and retried after the kernel's 1 s timeout, a stall no
    # CDN would cause.
    request_queue_size = 128


@contextmanager
def loopback(handler: Callable[..., BaseRequestHandler]) -> Iterator[str]:
    """A threading HTTP server on 127.0.0.1 (a free port); yields its base URL."""
    server = _Server(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
