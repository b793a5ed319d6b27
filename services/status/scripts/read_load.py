"""Status-read load on the status service alone: the figures in ../README.md.

Starts an embedded SecantusDB and one status service (`python -m imgpipe.status.main`),
publishes a 1,000-image request's events straight to the broker, waits until the service
shows them, then runs bench/status_load.py from a second process and prints requests per
second, latency, and the CPU the service and the database used per request (from
/proc, so a figure that a busy machine moves much less than the rate).

    .venv/bin/python services/status/scripts/read_load.py [--in-progress] [--runs 3]

`--in-progress` leaves one image without an outcome (the TTL path). Set
SERVER_PYTHONPATH to run the service from another source tree (before/after).
RabbitMQ must answer on AMQP_URL (default 127.0.0.1:5672).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

from imgpipe.contracts.bus import Bus
from imgpipe.contracts.events import (
    CloudEvent,
    Counts,
    ImageError,
    ImageProcessed,
    RequestCompleted,
    RequestReceived,
    Row,
    completed_event_id,
    image_key,
    processed_event_id,
    received_event_id,
)
from imgpipe.contracts.topology import Topology
from imgpipe.launcher.embedded import embedded_mongo, free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))
from status_load import LoadResult, status_load  # noqa: E402

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def request_events(request_id: str, images: int, base: str, outcomes: int) -> list[CloudEvent]:
    """Rows of three URLs like the benchmark's CSV; one image in 50 failed."""
    urls = [f"http://127.0.0.1:40000/img-{n % 300:04d}.jpg?v=status-{n}" for n in range(images)]
    rows = [
        Row(serial_number=str(n + 1), product_name=f"Product {n + 1}", input_urls=urls[i : i + 3])
        for n, i in enumerate(range(0, images, 3))
    ]
    data = RequestReceived(request_id=request_id, rows=rows, image_count=images, received_at=T0)
    events = [CloudEvent.wrap(data, source="load", id=received_event_id(request_id))]
    keys = [(r, p) for r, row in enumerate(rows) for p in range(len(row.input_urls))]
    for n, (r, p) in enumerate(keys[:outcomes]):
        key, ok = image_key(r, p), n % 50 != 7
        outcome = ImageProcessed(
            request_id=request_id,
            image_key=key,
            row_index=r,
            position=p,
            input_url=rows[r].input_urls[p],
            outcome="ok" if ok else "failed",
            output_url=f"{base}/media/{request_id}/{key}.jpg" if ok else None,
            bytes_in=500_000,
            bytes_out=90_000,
            width=1600,
            height=1200,
            format="JPEG",
            error=None if ok else ImageError(code="download_failed", message="HTTP 404"),
        )
        event = CloudEvent.wrap(outcome, source="load", id=processed_event_id(request_id, key))
        event.time = T0 + timedelta(milliseconds=n)
        events.append(event)
    if outcomes == images:
        failed = sum(1 for n in range(images) if n % 50 == 7)
        done = RequestCompleted(
            request_id=request_id,
            status="completed",
            counts=Counts(total=images, ok=images - failed, failed=failed),
            completed_at=T0 + timedelta(minutes=5),
        )
        events.append(CloudEvent.wrap(done, source="load", id=completed_event_id(request_id)))
    return events


async def publish(amqp_url: str, namespace: str, events: list[CloudEvent]) -> None:
    bus = await Bus.connect(amqp_url, Topology(namespace))
    try:
        await bus.publish_many(events)
    finally:
        await bus.close()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def database_pid() -> int:
    children = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()
    for child in children:
        if b"secantusd" in Path(f"/proc/{child}/cmdline").read_bytes():
            return int(child)
    raise LookupError("no SecantusDB child process")


def wait_ready(base: str) -> None:
    for _ in range(300):
        try:
            if httpx.get(f"{base}/readyz").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError("the status service never became ready")


def wait_shown(url: str, outcomes: int, final: bool) -> httpx.Response:
    for _ in range(600):
        response = httpx.get(url)
        if response.status_code == 200:
            body = response.json()
            shown = body["progress"]["ok"] + body["progress"]["failed"]
            if shown >= outcomes and (not final or body["status"] == "completed"):
                return response
        time.sleep(0.2)
    raise TimeoutError("the status service never showed the request")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--in-progress", action="store_true", help="one outcome missing")
    opt = parser.parse_args()
    amqp_url = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    work = Path(tempfile.mkdtemp(prefix="status-load-"))
    namespace, port = "load" + uuid.uuid4().hex[:8], free_port()
    base = f"http://127.0.0.1:{port}"
    with embedded_mongo(work / "db") as mongo_url, open(work / "status.log", "wb") as log:
        env = dict(os.environ, MONGODB_URL=mongo_url, AMQP_URL=amqp_url, STATUS_PORT=str(port))
        env |= {"IMGPIPE_NAMESPACE": namespace, "IMGPIPE_DATA_DIR": str(work / "data")}
        if os.environ.get("SERVER_PYTHONPATH"):
            env["PYTHONPATH"] = os.environ["SERVER_PYTHONPATH"]
        command = [sys.executable, "-m", "imgpipe.status.main"]
        service = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_ready(base)
            request_id = "req-" + uuid.uuid4().hex[:12]
            outcomes = opt.images - 1 if opt.in_progress else opt.images
            events = request_events(request_id, opt.images, base, outcomes)
            asyncio.run(publish(amqp_url, namespace, events))
            url = f"{base}/status/{request_id}"
            shown = wait_shown(url, outcomes, final=not opt.in_progress)
            print(f"{url}: {shown.json()['status']}, {len(shown.content):,} bytes", flush=True)
            database = database_pid()
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(1, mp_context=context) as pool:
                for _ in range(opt.runs):
                    service_cpu, database_cpu = cpu_seconds(service.pid), cpu_seconds(database)
                    job = pool.submit(status_load, url, opt.seconds, opt.concurrency)
                    result: LoadResult = job.result()
                    service_cpu = cpu_seconds(service.pid) - service_cpu
                    database_cpu = cpu_seconds(database) - database_cpu
                    report(result, service_cpu, database_cpu)
        finally:
            service.terminate()
            service.wait(10)


def report(result: LoadResult, service_cpu: float, database_cpu: float) -> None:
    per_request = 1000 / max(1, result.requests)
    figures = {
        "requests_per_second": round(result.requests_per_second),
        "errors": result.errors,
        "p50_ms": round(result.p50_ms, 1),
        "p99_ms": round(result.p99_ms, 1),
        "service_cpu_ms_per_request": round(service_cpu * per_request, 3),
        "database_cpu_ms_per_request": round(database_cpu * per_request, 3),
        "client_cpu_ms_per_request": round(result.client_cpu_seconds * per_request, 3),
        "load_average": round(os.getloadavg()[0], 1),
    }
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
