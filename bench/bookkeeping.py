"""The bookkeeping phase: requests of tiny images, so that the codec costs almost
nothing and what is measured is the pipeline's own work per image (fan-out, records,
events, the read model, the status answer, the output CSV, the final webhook).

For each size (1,000, 10,000 and 100,000 images by default): images per second end to
end, CPU per image by process, each service's peak memory after it, the database's
size on disk, and `GET /status/{id}` latency (p50, p99) while the request runs and
after. The targets are the issue's: at 100,000, images per second within 20% of the
figure at 1,000, every service's peak memory within 1.5 times its figure at 1,000, the
status p99 under 50 ms, and the 202 for the CSV under 10 s.
"""

from __future__ import annotations

import io
import multiprocessing
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from corpus import image_urls, serve
from memory import ProcessPeak
from PIL import Image

TINY_SIDE = 64
TINY_FILES = 64  # distinct pictures; every URL is distinct anyway (`?v=`)
RATE_TARGET = 0.8  # of the rate at the smallest size
MEMORY_TARGET = 1.5  # times the peak at the smallest size
STATUS_P99_TARGET_MS = 50.0
UPLOAD_TARGET_S = 10.0
READ_SECONDS_AFTER = 5.0

# What the phase needs from bench/run.py, passed in to keep the import one way.
EndToEnd = Callable[[list[str], Path, Callable[[str], None]], dict[str, Any]]
Snapshot = Callable[[], dict[int, ProcessPeak]]


def tiny_corpus(directory: Path) -> list[str]:
    """TINY_FILES distinct 64x64 JPEGs; returns their file names."""
    directory.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(TINY_FILES):
        name = f"tiny-{i}.jpg"
        image = Image.new("RGB", (TINY_SIDE, TINY_SIDE), ((i * 37) % 256, (i * 91) % 256, 128))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        (directory / name).write_bytes(buffer.getvalue())
        names.append(name)
    return names


def run_bookkeeping(
    sizes: tuple[int, ...],
    work_dir: Path,
    end_to_end: EndToEnd,
    memory_snapshot: Snapshot,
    status_url: Callable[[str], str],
    headers: dict[str, str],
    database_dir: Path,
) -> dict[str, Any]:
    """Every size in turn on the running system; the figures and the targets' verdicts."""
    names = tiny_corpus(work_dir / "tiny")
    results: list[dict[str, Any]] = []
    with serve(work_dir / "tiny") as base_url:
        for size in sizes:
            urls = list(image_urls(base_url, names, size, f"book{size}"))
            reads = StatusReads(status_url, headers)
            run = end_to_end(urls, work_dir / f"bookkeeping-{size}.csv", reads.follow)
            reads.stop()
            after = reads.after(run["request_id"], READ_SECONDS_AFTER)
            figures = run | {
                "status_while_running": reads.figures(),
                "status_after": after,
                "memory_mib": _service_peaks(memory_snapshot()),
                "database_mib": _size_mib(database_dir),
            }
            _print(size, figures)
            results.append(figures)
    return {"sizes": results, "verdicts": verdicts(results)}


class StatusReads:
    """Reads the first page of a request's status every 50 ms while the request runs,
    and records each answer's latency. From a process of its own: in this one, the
    threads serving the corpus would hold the GIL while an answer waits to be read."""

    def __init__(self, status_url: Callable[[str], str], headers: dict[str, str]) -> None:
        self.status_url = status_url
        self.headers = headers
        self._context = multiprocessing.get_context("spawn")
        self._stop = self._context.Event()
        self._results: Any = self._context.Queue()
        self._process: Any = None
        self._figures: dict[str, Any] = _latency_figures([], 0)

    def follow(self, request_id: str) -> None:
        """Start reading `request_id` (called once its upload answered)."""
        args = (self.status_url(request_id), self.headers, self._stop, 0.05, None, self._results)
        self._process = self._context.Process(target=_read_loop, args=args, daemon=True)
        self._process.start()

    def stop(self) -> None:
        self._stop.set()
        if self._process is not None:
            latencies, errors = self._results.get(timeout=60)
            self._process.join(10)
            self._figures = _latency_figures(latencies, errors)

    def figures(self) -> dict[str, Any]:
        return self._figures

    def after(self, request_id: str, seconds: float) -> dict[str, Any]:
        """The same reads, as fast as one client goes, for `seconds` after the end."""
        stop, results = self._context.Event(), self._context.Queue()
        args = (self.status_url(request_id), self.headers, stop, 0.0, seconds, results)
        process = self._context.Process(target=_read_loop, args=args, daemon=True)
        process.start()
        latencies, errors = results.get(timeout=seconds + 60)
        process.join(10)
        return _latency_figures(latencies, errors)


def _read_loop(
    url: str,
    headers: dict[str, str],
    stop: Any,
    interval: float,
    seconds: float | None,
    results: Any,
) -> None:
    """In the child: read `url` every `interval` until `stop` is set (or for `seconds`);
    put (latencies in ms, errors) on `results`."""
    latencies: list[float] = []
    errors = 0
    until = None if seconds is None else time.perf_counter() + seconds
    with _client(headers) as http:
        while not stop.is_set() and (until is None or time.perf_counter() < until):
            errors += _timed_get(http, url, latencies)
            if interval:
                stop.wait(interval)
    results.put((latencies, errors))


@contextmanager
def _client(headers: dict[str, str]) -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30.0, headers=headers) as http:
        yield http


def _timed_get(http: httpx.Client, url: str, latencies: list[float]) -> int:
    """One read; its latency goes to `latencies`; returns 1 for an error, else 0."""
    started = time.perf_counter()
    try:
        response = http.get(url)
    except httpx.HTTPError:
        return 1
    if response.status_code == 404:  # not in the read model yet: not a read of it
        return 0
    latencies.append((time.perf_counter() - started) * 1000)
    return 0 if response.status_code == 200 else 1


def _latency_figures(latencies: list[float], errors: int) -> dict[str, Any]:
    if len(latencies) < 2:
        return {"reads": len(latencies), "errors": errors, "p50_ms": None, "p99_ms": None}
    cuts = statistics.quantiles(latencies, n=100)
    return {"reads": len(latencies), "errors": errors, "p50_ms": cuts[49], "p99_ms": cuts[98]}


def _service_peaks(snapshot: dict[int, ProcessPeak]) -> dict[str, float]:
    """Peak memory (VmHWM, MiB) per service so far, its pool workers apart."""
    peaks: dict[str, float] = {}
    for peak in snapshot.values():
        label = peak.label if peak.label.endswith("worker") else peak.service
        peaks[label] = max(peaks.get(label, 0.0), peak.peak_kib / 1024)
    return peaks


def _size_mib(directory: Path) -> float | None:
    if not directory.exists():
        return None  # an external MongoDB (MONGODB_URL): not on this disk
    total = sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())
    return total / 2**20


def verdicts(results: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Each target of the largest size against the smallest: the figures and met/missed."""
    if len(results) < 2:
        return []
    small, large = results[0], results[-1]
    rate = large["images_per_second"] / small["images_per_second"]
    rows = [
        (
            f"images/s at {large['images']:,} vs {small['images']:,}",
            f"{rate:.2f} x ({_met(rate >= RATE_TARGET)} the {RATE_TARGET:.1f} target)",
        )
    ]
    for service, mib in sorted(large["memory_mib"].items()):
        base = small["memory_mib"].get(service)
        if base:
            ratio = mib / base
            rows.append(
                (
                    f"peak memory, {service}",
                    f"{base:.0f} -> {mib:.0f} MiB = {ratio:.2f} x "
                    f"({_met(ratio <= MEMORY_TARGET)} the {MEMORY_TARGET} x target)",
                )
            )
    for when in ("status_while_running", "status_after"):
        p99 = large[when]["p99_ms"]
        if p99 is not None:
            met = _met(p99 < STATUS_P99_TARGET_MS)
            rows.append(
                (
                    f"GET /status p99 at {large['images']:,}, {when.removeprefix('status_')}",
                    f"{p99:.1f} ms ({met} the {STATUS_P99_TARGET_MS:.0f} ms target)",
                )
            )
    upload = large["seconds_to_202"]
    rows.append(
        (
            f"{large['rows']:,}-row CSV ({large['images']:,} URLs), upload to 202",
            f"{upload:.2f} s ({_met(upload < UPLOAD_TARGET_S)} the {UPLOAD_TARGET_S:.0f} s target)",
        )
    )
    return rows


def table_rows(results: dict[str, Any]) -> list[tuple[str, str]]:
    """One row per size, then the verdicts: for the printed report."""
    rows = []
    for run in results["sizes"]:
        cpu = sum(run["cpu_ms_per_image"].values())
        running, after = run["status_while_running"], run["status_after"]
        rows.append(
            (
                f"{run['images']:,} tiny images ({run['status']})",
                f"{run['images_per_second']:7.1f} images/s, {cpu:5.2f} ms CPU per image, "
                f"202 after {run['seconds_to_202']:.2f} s, database "
                f"{_mib_text(run['database_mib'])}, status p50/p99 "
                f"{_ms(running['p50_ms'])}/{_ms(running['p99_ms'])} running, "
                f"{_ms(after['p50_ms'])}/{_ms(after['p99_ms'])} after",
            )
        )
    return rows + [(f"  {label}", value) for label, value in results["verdicts"]]


def _print(size: int, figures: dict[str, Any]) -> None:
    running, after = figures["status_while_running"], figures["status_after"]
    print(
        f"  {size:,} tiny images: {figures['images_per_second']:.1f} images/s; status p99 "
        f"{_ms(running['p99_ms'])} running, {_ms(after['p99_ms'])} after; memory "
        + ", ".join(f"{name} {mib:.0f}" for name, mib in sorted(figures["memory_mib"].items()))
        + " MiB"
    )


def _met(ok: bool) -> str:
    return "meets" if ok else "misses"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def _mib_text(value: float | None) -> str:
    return "external" if value is None else f"{value:.0f} MiB"
