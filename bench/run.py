"""imgpipe benchmark: codec limit vs end to end, remote host, memory, upload, status reads,
the same catalogue uploaded again.

Run from the repository root: `make bench` (or `uv run --frozen python bench/run.py`).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import PIL
import report
from bookkeeping import run_bookkeeping, table_rows
from codec import SSIM_TOLERANCE, CodecResult, FormatCost, Quality, codec_pool
from corpus import Corpus, build_corpus, image_urls, serve, write_csv
from cpu import per_image_ms, snapshot
from finals import Finals, hear_completions, receive_webhooks
from memory import MemorySampler, ProcessPeak
from status_load import LoadResult, status_load
from system import System

# The remote host lives in tests/support; `python bench/run.py` puts only bench/ on
# sys.path, so the repository root goes right after it (bench's own modules come first).
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(1, str(ROOT))

from tests.support.remote_host import Behaviour, remote_host  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
WARM_UP_IMAGES = 24
CORES = os.cpu_count() or 1
# A CDN far away: 40 ms before each answer, 429 + Retry-After: 1 to a seventh request
# in progress at once, a 503 on the first request for one URL in five.
REMOTE_HOST = Behaviour(latency=0.04, max_connections=6, throttle_retry_after="1", hiccup_one_in=5)
REMOTE_TARGET = 0.9  # of the loopback end-to-end figure
# The same catalogue uploaded again: at least this many times faster than its first run,
# and under this much CPU per image in all processes together.
INCREMENTAL_SPEEDUP = 10.0
# End to end against the reference (a hand-written Pillow loop in a pool), and the CPU
# per image every other process may spend.
REFERENCE_TARGET = 0.75
OUTSIDE_CODEC_MS = 6.0
NOT_PIPELINE = ("processor pool workers", "benchmark")
QUALITY_SAMPLE = 30  # corpus images whose outputs' SSIM is measured
INCREMENTAL_CPU_MS = 2.0


@dataclass(frozen=True)
class Sizes:
    corpus: int = 300
    status_request: int = 1_000
    scale: int = 5_000
    big_upload_rows: int = 10_000
    status_seconds: float = 10.0
    bookkeeping: tuple[int, ...] = (1_000, 10_000, 100_000)


QUICK = Sizes(
    corpus=30,
    status_request=90,
    scale=600,
    big_upload_rows=1_000,
    status_seconds=5.0,
    bookkeeping=(200, 2_000),
)


@dataclass(frozen=True)
class Options:
    sizes: Sizes
    scale: bool
    remote: bool
    concurrency: int
    keep_data: bool
    bookkeeping: bool = True
    incremental: bool = True
    only_incremental: bool = False  # the incremental phase alone: no codec, no other phase
    only_bookkeeping: bool = False  # the bookkeeping phase alone, likewise


@dataclass(frozen=True)
class Run:
    """What every phase works with: the running system and the corpus it reads."""

    options: Options
    system: System
    sampler: MemorySampler
    corpus: Corpus
    base_url: str
    webhook_url: str
    finals: Finals


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small corpus: a smoke run")
    parser.add_argument("--scale", action="store_true", help="run the scale phase even if --quick")
    parser.add_argument("--skip-scale", action="store_true", help="leave out the scale phase")
    parser.add_argument(
        "--skip-remote", action="store_true", help="leave out the remote-host phase"
    )
    parser.add_argument(
        "--skip-bookkeeping",
        action="store_true",
        help="leave out the bookkeeping phase (tiny images, up to 100,000 in a request)",
    )
    parser.add_argument(
        "--skip-incremental", action="store_true", help="leave out the upload-again phase"
    )
    parser.add_argument(
        "--only-bookkeeping",
        action="store_true",
        help="run the bookkeeping phase alone (no codec limit, no other phase)",
    )
    parser.add_argument(
        "--bookkeeping-sizes",
        metavar="N,N,...",
        help="images per bookkeeping request (default 1000,10000,100000; --quick 200,2000)",
    )
    parser.add_argument(
        "--only-incremental",
        action="store_true",
        help="run the upload-again phase alone (no codec limit, no other phase)",
    )
    parser.add_argument("--concurrency", type=int, default=16, help="status-read clients")
    parser.add_argument("--keep-data", action="store_true", help="keep media and database files")
    args = parser.parse_args(argv)
    scale = not args.skip_scale and (args.scale or not args.quick)
    sizes = QUICK if args.quick else Sizes()
    if args.bookkeeping_sizes:
        counts = tuple(int(count) for count in args.bookkeeping_sizes.split(","))
        sizes = replace(sizes, bookkeeping=counts)
    return Options(
        sizes,
        scale,
        not args.skip_remote,
        args.concurrency,
        args.keep_data,
        bookkeeping=not args.skip_bookkeeping,
        incremental=not args.skip_incremental,
        only_incremental=args.only_incremental,
        only_bookkeeping=args.only_bookkeeping,
    )


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    corpus = build_corpus(OUT, options.sizes.corpus, CORES)
    print(f"corpus: {len(corpus.files)} images, {corpus.total_bytes / 2**20:.0f} MiB")
    if options.only_incremental:
        return _alone(options, corpus, "incremental", "The same catalogue again", _incremental_rows)
    if options.only_bookkeeping:
        return _alone(options, corpus, "bookkeeping", "Bookkeeping: tiny images", table_rows)
    before = measure_codec(corpus, options, "before", with_formats=True)
    results: dict[str, Any] = {"machine": _machine(), "formats": _format_figures(before.formats)}
    if before.quality is not None:
        results["quality"] = asdict(before.quality)
    finals = Finals()
    with serve(corpus.directory) as base_url, receive_webhooks(finals) as webhook_url:
        results |= run_system(options, corpus, base_url, webhook_url, finals)
    after = measure_codec(corpus, options, "after")
    # This machine's speed drifts by ~10% from minute to minute (a shared VM): the limit
    # and the reference are measured on both sides of the system run, and the ratios use
    # both.
    results["codec"] = _both(before.limit, after.limit)
    results["reference"] = _both(before.reference, after.reference)
    results["table"] = _table(results)
    print("\n" + report.render(results))
    report.write(results, OUT / "results.json")
    report.write(results, Path(results["run_dir"]) / "results.json")
    print(f"\nwritten to {OUT / 'results.json'}")
    return 0


def _alone(
    options: Options,
    corpus: Corpus,
    name: str,
    title: str,
    rows_of: Callable[[Any], list[tuple[str, str]]],
) -> int:
    """`--only-<name>`: the system, its warm-up, and that one phase (`_phases` picks it)."""
    results: dict[str, Any] = {"machine": _machine()}
    finals = Finals()
    with serve(corpus.directory) as base_url, receive_webhooks(finals) as webhook_url:
        results |= run_system(options, corpus, base_url, webhook_url, finals)
    print("\n" + "\n".join(report.section(title, rows_of(results[name]))))
    path = OUT / f"results-{name}.json"
    report.write(results, path)
    print(f"written to {path}")
    return 0


@dataclass(frozen=True)
class CodecFigures:
    limit: CodecResult  # the processor's own compress()
    reference: CodecResult  # the hand-written Pillow loop
    formats: list[FormatCost]
    quality: Quality | None


def measure_codec(
    corpus: Corpus, options: Options, when: str, with_formats: bool = False
) -> CodecFigures:
    """The codec limit and the reference, then (if asked) each format's cost and the
    outputs' quality, in the same warm pool."""
    with codec_pool(CORES) as pool:
        least = max(60, options.sizes.corpus)
        codec = pool.limit(corpus.files, min_images=least)
        print(f"codec limit {when}: {codec.images_per_second:.1f} images/s ({codec.function})")
        reference = pool.reference(corpus.files, min_images=least)
        print(f"reference {when}: {reference.images_per_second:.1f} images/s")
        formats = pool.formats(corpus.files) if with_formats else []
        quality = pool.quality(corpus.files[:QUALITY_SAMPLE]) if with_formats else None
    for cost in formats:
        print(
            f"  {cost.label}: {cost.images_per_second:.1f} images/s, "
            f"{cost.kib_out_per_image:.1f} KiB out per image ({cost.images} images)"
        )
    if quality is not None:
        print(f"  mean SSIM: {quality.ssim:.4f} (reference {quality.reference_ssim:.4f})")
    return CodecFigures(codec, reference, formats, quality)


def _both(before: CodecResult, after: CodecResult) -> dict[str, Any]:
    both = before.combined(after)
    return asdict(both) | {
        "images_per_second": both.images_per_second,
        "before": before.images_per_second,
        "after": after.images_per_second,
    }


def _format_figures(formats: list[FormatCost]) -> list[dict[str, Any]]:
    return [
        asdict(cost)
        | {
            "images_per_second": cost.images_per_second,
            "kib_out_per_image": cost.kib_out_per_image,
        }
        for cost in formats
    ]


def run_system(
    options: Options, corpus: Corpus, base_url: str, webhook_url: str, finals: Finals
) -> dict[str, Any]:
    """Start `imgpipe up`, run every phase against it, stop it; returns the figures."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    system = System(OUT / f"run-{stamp}", f"bench{uuid.uuid4().hex[:8]}")
    print(f"starting `imgpipe up` (data: {system.data_dir}, namespace: {system.namespace})")
    results: dict[str, Any] = {"run_dir": str(system.data_dir), "namespace": system.namespace}
    try:
        sampler = MemorySampler(system.start())
        with _sampling(sampler):
            run = Run(options, system, sampler, corpus, base_url, webhook_url, finals)
            with hear_completions(system.namespace, finals):
                snapshots = run_phases(run, results)
    finally:
        system.stop()
        if not options.keep_data:
            _drop_bulk_data(system.data_dir)
    results["memory_phases"] = list(snapshots)
    results["memory"] = report.memory_table(snapshots)
    return results


def run_phases(run: Run, results: dict[str, Any]) -> dict[str, dict[int, ProcessPeak]]:
    """Each phase adds its figures to `results`; returns the memory peaks after each one."""
    snapshots = {"idle": run.sampler.snapshot()}
    warm_up(run)
    for name, title, phase in _phases(run.options):
        print(f"phase: {title}")
        results[name] = phase(run)
        snapshots[title] = run.sampler.snapshot()
    return snapshots


@contextmanager
def _sampling(sampler: MemorySampler) -> Iterator[None]:
    sampler.start()
    try:
        yield
    finally:
        sampler.stop()


def _phases(options: Options) -> list[tuple[str, str, Any]]:
    """(key in results, title in the memory table, function), in the order they run."""
    sizes = options.sizes
    incremental = ("incremental", f"{sizes.status_request:,} again", phase_incremental)
    if options.only_incremental:
        return [incremental]
    bookkeeping = ("bookkeeping", f"up to {max(sizes.bookkeeping):,} tiny", phase_bookkeeping)
    if options.only_bookkeeping:
        return [bookkeeping]
    phases: list[tuple[str, str, Any]] = [
        ("end_to_end", f"{sizes.corpus:,} images", phase_end_to_end),
    ]
    if options.remote:
        phases.append(("remote_host", f"{sizes.corpus:,} remote", phase_remote_host))
    phases.append(("status_reads", f"{sizes.status_request:,} + reads", phase_status_reads))
    if options.incremental:
        phases.append(incremental)
    if options.scale:
        phases.append(("scale", f"{sizes.scale:,} images", phase_scale))
    if options.bookkeeping:
        phases.append(bookkeeping)
    # Last: the system stops right after its 202, so its images are never processed.
    phases.append(("big_upload", f"{sizes.big_upload_rows:,}-row upload", phase_big_upload))
    return phases


def end_to_end(
    run: Run,
    urls: list[str],
    csv_path: Path,
    refresh: bool = True,
    on_accepted: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Upload a CSV of `urls`; images per second from the upload request to `completed`,
    and the CPU each process spent per image meanwhile. `on_accepted` is told the
    request id once the upload answered.

    `refresh` (the default): every image downloaded and encoded anew, as before outputs
    could be reused. The URLs cycle over the corpus, so without it a phase would find
    the pictures an earlier phase encoded and measure the reuse, not the work."""
    system = run.system
    rows = write_csv(csv_path, urls)
    cpu_before = snapshot(run.sampler)
    upload = system.upload(csv_path, webhook_url=run.webhook_url, refresh=refresh)
    on_accepted(upload.request_id)
    final_heard = run.finals.event(upload.request_id)
    final, done_at = system.wait_final(upload.request_id, 120 + len(urls), final_heard)
    seconds = done_at - upload.started
    cpu = per_image_ms(cpu_before, snapshot(run.sampler), len(urls))
    progress = final.get("progress") or {}
    print(f"  {len(urls)} images: {final.get('status')} in {seconds:.1f} s, {progress}")
    return {
        "request_id": upload.request_id,
        "images": len(urls),
        "rows": rows,
        "status": final.get("status"),
        "progress": progress,
        "seconds_to_202": upload.seconds_to_202,
        "seconds": seconds,
        "images_per_second": len(urls) / seconds,
        "bytes": final.get("bytes"),  # input, output, ratio of the stored images
        "reused": final.get("reused"),  # images whose earlier output was reused, by reason
        "cpu_ms_per_image": cpu,
    }


def warm_up(run: Run) -> None:
    """One small request before any figure is taken, as any benchmark of a service warms
    it: the first request after start-up opens connections, creates collections and
    fills caches in every service, and would be charged to the first measured phase."""
    urls = list(image_urls(run.base_url, run.corpus.names, WARM_UP_IMAGES, "warm-up"))
    result = end_to_end(run, urls, run.system.data_dir / "warm-up.csv")
    print(f"warm-up: {WARM_UP_IMAGES} images in {result['seconds']:.2f} s (not counted)")


def phase_end_to_end(run: Run) -> Any:
    urls = list(image_urls(run.base_url, run.corpus.names, len(run.corpus.names), "e2e"))
    return end_to_end(run, urls, run.system.data_dir / "e2e.csv")


def phase_remote_host(run: Run) -> Any:
    """The end-to-end request again, from a host that answers like a real CDN far away;
    afterwards, what the host saw: peak connections and requests, answers by status."""
    host_running = remote_host(directory=run.corpus.directory, behaviour=REMOTE_HOST)
    with host_running as host:
        names = run.corpus.names
        urls = list(image_urls(host.base_url, names, len(names), "remote"))
        result = end_to_end(run, urls, run.system.data_dir / "remote.csv")
        statuses = host.statuses()
        figures = {
            "behaviour": asdict(REMOTE_HOST),
            "peak_connections": host.peak_connections,
            "peak_in_flight": host.peak_in_flight,
            "requests": sum(statuses.values()),
            "statuses": {str(code): statuses[code] for code in sorted(statuses)},
        }
    print(
        f"  host: {figures['peak_connections']} connections at most, "
        f"{figures['peak_in_flight']} requests in flight at most, answers {figures['statuses']}"
    )
    return result | {"host": figures}


def phase_incremental(run: Run) -> Any:
    """A 1,000-image catalogue, then the same CSV again: the second upload asks the host
    before each download (its corpus server sends Last-Modified and answers 304), and
    reuses every output. Both runs' images per second and CPU per image, side by side."""
    count = run.options.sizes.status_request
    urls = list(image_urls(run.base_url, run.corpus.names, count, "incremental"))
    csv_path = run.system.data_dir / "incremental.csv"
    first = end_to_end(run, urls, csv_path, refresh=True)
    again = end_to_end(run, urls, csv_path, refresh=False)
    speedup = again["images_per_second"] / first["images_per_second"]
    cpu_first = sum(first["cpu_ms_per_image"].values())
    cpu_again = sum(again["cpu_ms_per_image"].values())
    print(
        f"  again: {speedup:.1f} x faster, {cpu_again:.2f} ms CPU per image "
        f"(first {cpu_first:.1f} ms), reused {again.get('reused')}"
    )
    return {
        "first": first,
        "again": again,
        "speedup": speedup,
        "cpu_ms_per_image_first": cpu_first,
        "cpu_ms_per_image_again": cpu_again,
    }


def phase_scale(run: Run) -> Any:
    urls = list(image_urls(run.base_url, run.corpus.names, run.options.sizes.scale, "scale"))
    return end_to_end(run, urls, run.system.data_dir / "scale.csv")


def phase_bookkeeping(run: Run) -> Any:
    """Requests of tiny images at each size: the pipeline's own cost as requests grow."""
    system = run.system
    return run_bookkeeping(
        run.options.sizes.bookkeeping,
        system.data_dir,
        lambda urls, path, on_accepted: end_to_end(run, urls, path, on_accepted=on_accepted),
        run.sampler.snapshot,
        system.status_endpoint,
        system.headers,
        system.data_dir / "mongo",
    )


def phase_status_reads(run: Run) -> Any:
    """Complete a request, then read its status from a second process under load."""
    system, opt = run.system, run.options
    count = opt.sizes.status_request
    urls = list(image_urls(run.base_url, run.corpus.names, count, "status"))
    request = end_to_end(run, urls, system.data_dir / "status.csv")
    load = _load_in_child(
        system.status_endpoint(request["request_id"]),
        opt.sizes.status_seconds,
        opt.concurrency,
        system.headers,
    )
    rate, p50, p99 = load.requests_per_second, load.p50_ms, load.p99_ms
    print(f"  {rate:.0f} req/s, p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    figures = asdict(load) | {"requests_per_second": load.requests_per_second}
    return {"request": request, "concurrency": opt.concurrency, "load": figures}


def _load_in_child(url: str, seconds: float, concurrency: int, headers: dict[str, str]) -> Any:
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        result: LoadResult = pool.submit(status_load, url, seconds, concurrency, headers).result()
    return result


def phase_big_upload(run: Run) -> Any:
    """Time to 202 for a large CSV; the run stops right after, so nothing waits on it."""
    system = run.system
    rows = run.options.sizes.big_upload_rows
    urls = list(image_urls(run.base_url, run.corpus.names, rows * 3, "big"))
    csv_path = system.data_dir / "big.csv"
    write_csv(csv_path, urls)
    upload = system.upload(csv_path)
    time.sleep(1.0)  # let the memory sampler see ingest right after the upload
    print(f"  {rows} rows: 202 after {upload.seconds_to_202:.2f} s")
    return {
        "rows": rows,
        "images": len(urls),
        "csv_bytes": csv_path.stat().st_size,
        "seconds_to_202": upload.seconds_to_202,
    }


def _table(results: dict[str, Any]) -> dict[str, list[tuple[str, str]]]:
    codec, reference = results["codec"], results["reference"]
    limit, bar = codec["images_per_second"], reference["images_per_second"]
    throughput = [
        (
            f"codec limit ({codec['workers']} processes, {codec['function']}; "
            f"{codec['before']:.1f} before the system ran, {codec['after']:.1f} after)",
            f"{limit:8.1f}",
        ),
        (
            f"reference ({reference['workers']} processes, {reference['function']}; "
            f"{reference['before']:.1f} before, {reference['after']:.1f} after)",
            f"{bar:8.1f}",
        ),
    ]
    for name in ("end_to_end", "status_reads", "scale"):
        run = results.get(name)
        run = run["request"] if name == "status_reads" and run else run
        if run:
            rate = run["images_per_second"]
            label = f"end to end, {run['images']:,} images ({run['status']}, {_counts(run)})"
            verdict = _met(rate / bar / REFERENCE_TARGET)
            value = (
                f"{rate:8.1f}  = {rate / bar:.2f} x the reference ({verdict} the "
                f"{REFERENCE_TARGET} target), {rate / limit:.0%} of the codec limit"
                f"{_bytes_out(run)}"
            )
            throughput.append((label, value))
        if name == "end_to_end" and "remote_host" in results:
            throughput += _remote_rows(results["remote_host"], results["end_to_end"])
    if "incremental" in results:
        throughput += _incremental_rows(results["incremental"])
    big = results["big_upload"]
    upload = [(f"{big['rows']:,}-row CSV ({big['images']:,} URLs), upload to 202", _s(big))]
    upload += [
        (f"{results[n]['rows']:,}-row CSV, upload to 202", _s(results[n]))
        for n in ("end_to_end", "scale")
        if n in results
    ]
    if "quality" in results:
        throughput.append(_quality_row(results["quality"]))
    return {
        "throughput": throughput,
        "formats": _format_rows(results["formats"]),
        "upload": upload,
        "status": _status_rows(results),
        "cpu": _cpu_rows(results),
        "bookkeeping": table_rows(results["bookkeeping"]) if "bookkeeping" in results else [],
    }


def _remote_rows(remote: dict[str, Any], loopback: dict[str, Any]) -> list[tuple[str, str]]:
    """The remote-host run beside the loopback one, and what the host saw."""
    rate = remote["images_per_second"]
    ratio = rate / loopback["images_per_second"]
    # Failed images finish early (a 429 or 503 not retried costs one round trip): a run
    # with failures does not meet the target, however fast it was.
    failed = remote["progress"].get("failed")
    verdict = "meets" if ratio >= REMOTE_TARGET and failed == 0 else "misses"
    label = f"remote host, {remote['images']:,} images ({remote['status']}, {_counts(remote)})"
    value = (
        f"{rate:8.1f}  = {ratio:.2f} x end to end on loopback "
        f"({verdict} the {REMOTE_TARGET:.2f} target)"
    )
    host, behaviour = remote["host"], remote["host"]["behaviour"]
    statuses = host["statuses"]
    host_label = (
        f"remote host's view ({behaviour['latency'] * 1000:.0f} ms latency, "
        f"429 beyond {behaviour['max_connections']} requests at once, "
        f"503 for 1 URL in {behaviour['hiccup_one_in']})"
    )
    host_value = (
        f"peak {host['peak_connections']} connections, "
        f"{host['peak_in_flight']} requests in flight; {host['requests']:,} answers: "
        f"{statuses.get('200', 0):,} x 200, {statuses.get('429', 0):,} x 429, "
        f"{statuses.get('503', 0):,} x 503"
    )
    others = host["requests"] - sum(statuses.get(code, 0) for code in ("200", "429", "503"))
    if others:
        host_value += f", {others:,} other ({', '.join(sorted(statuses))})"
    return [(label, value), (host_label, host_value)]


def _incremental_rows(incremental: dict[str, Any]) -> list[tuple[str, str]]:
    """The catalogue's first upload beside the second, and the second's verdict."""
    first, again = incremental["first"], incremental["again"]
    speedup, cpu = incremental["speedup"], incremental["cpu_ms_per_image_again"]
    met = speedup >= INCREMENTAL_SPEEDUP and cpu < INCREMENTAL_CPU_MS
    met = met and again["progress"].get("failed") == 0
    reused = again.get("reused") or {}
    return [
        (
            f"same catalogue, first upload, {first['images']:,} images ({_counts(first)})",
            f"{first['images_per_second']:8.1f}  "
            f"{incremental['cpu_ms_per_image_first']:.1f} ms CPU per image",
        ),
        (
            f"same catalogue again ({reused.get('not_modified', 0):,} not modified, "
            f"{reused.get('same_bytes', 0):,} same bytes)",
            f"{again['images_per_second']:8.1f}  {cpu:.2f} ms CPU per image, "
            f"{speedup:.1f} x the first ({'meets' if met else 'misses'} the "
            f"{INCREMENTAL_SPEEDUP:.0f} x and {INCREMENTAL_CPU_MS:.0f} ms targets)",
        ),
    ]


def _bytes_out(run: dict[str, Any]) -> str:
    """Output bytes per stored image, as GET /status/{id} counts them; blank if absent."""
    sizes = run.get("bytes") or {}
    if not sizes.get("images"):
        return ""
    per_image = sizes["output"] / sizes["images"] / 1024
    return f", {per_image:.1f} KiB out per image ({sizes['ratio']:.2f} of the input)"


def _format_rows(formats: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Each format's speed and bytes, and both relative to the default JPEG."""
    if not formats:
        return [("(the codec takes no request options: not measured)", "")]
    base = formats[0]
    rows = []
    for cost in formats:
        label = f"{cost['label']}, {cost['images']} images"
        value = (
            f"{cost['images_per_second']:8.1f} images/s = "
            f"{cost['images_per_second'] / base['images_per_second']:.2f} x jpeg, "
            f"{cost['kib_out_per_image']:7.1f} KiB out per image = "
            f"{cost['kib_out_per_image'] / base['kib_out_per_image']:.2f} x jpeg"
        )
        rows.append((label, value))
    return rows


def _cpu_rows(results: dict[str, Any]) -> list[tuple[str, str]]:
    """CPU per image of the largest end-to-end run, by process group, and outside the
    codec (every process but the pool workers and the benchmark itself)."""
    runs = [results[n] for n in ("end_to_end", "scale") if n in results]
    run = max(runs, key=lambda r: r["images"])
    cpu = run["cpu_ms_per_image"]
    rows = [(name, f"{ms:6.1f}") for name, ms in cpu.items() if ms >= 0.05]
    outside = sum(ms for name, ms in cpu.items() if not name.startswith(NOT_PIPELINE))
    verdict = _met(OUTSIDE_CODEC_MS / outside if outside else 1.0)
    return rows + [
        (f"total ({run['images']:,} images)", f"{sum(cpu.values()):6.1f}"),
        (
            "outside the codec (all but the pool workers and the benchmark)",
            f"{outside:6.1f}  ({verdict} the {OUTSIDE_CODEC_MS:.0f} ms target)",
        ),
    ]


def _quality_row(quality: dict[str, Any]) -> tuple[str, str]:
    """Output quality may not drop: the mean SSIM against the input, beside the reference's."""
    ours, reference = quality["ssim"], quality["reference_ssim"]
    verdict = "meets" if ours >= reference - SSIM_TOLERANCE else "misses"
    return (
        f"output quality, mean SSIM against the input ({quality['images']} images)",
        f"{ours:.4f}, reference {reference:.4f} ({verdict}: within {SSIM_TOLERANCE})",
    )


def _met(ratio_of_target: float) -> str:
    return "meets" if ratio_of_target >= 1.0 else "misses"


def _counts(run: dict[str, Any]) -> str:
    progress = run["progress"]
    return f"{progress.get('ok', '?')} ok, {progress.get('failed', '?')} failed"


def _s(run: dict[str, Any]) -> str:
    return f"{run['seconds_to_202']:.2f} s"


def _status_rows(results: dict[str, Any]) -> list[tuple[str, str]]:
    reads = results["status_reads"]
    load = reads["load"]
    label = (
        f"GET /status/{{id}}, {reads['request']['images']:,}-image request, "
        f"{reads['concurrency']} clients, {load['seconds']:.0f} s"
    )
    value = (
        f"{load['requests_per_second']:.0f} req/s, p50 {load['p50_ms']:.1f} ms, "
        f"p99 {load['p99_ms']:.1f} ms, {load['errors']} errors, "
        f"{load['bytes_per_response'] / 1024:.0f} KiB per response, "
        f"client CPU {load['client_cpu_seconds'] / load['seconds']:.0%} of a core"
    )
    return [(label, value)]


def _machine() -> str:
    database = "MongoDB (MONGODB_URL)" if os.environ.get("MONGODB_URL") else "embedded SecantusDB"
    return (
        f"{CORES} cores, Python {platform.python_version()}, Pillow {PIL.__version__}, "
        f"{database}, {datetime.now().isoformat(timespec='seconds')}"
    )


def _drop_bulk_data(run_dir: Path) -> None:
    """Media and database files are large; the logs and CSVs stay for inspection."""
    for name in ("media", "mongo"):
        shutil.rmtree(run_dir / name, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
