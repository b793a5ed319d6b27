"""Status reads under load: a fixed number of concurrent clients for a fixed time.

Runs in its own process (the benchmark starts it with multiprocessing), so the
client's CPU does not share an interpreter with the harness.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from dataclasses import dataclass

import httpx


@dataclass(frozen=True)
class LoadResult:
    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float
    bytes_per_response: int
    client_cpu_seconds: float  # near `seconds`: the client, not the server, is the limit

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.seconds


async def _client_loop(
    http: httpx.AsyncClient, url: str, until: float, latencies: list[float], errors: list[int]
) -> int:
    size = 0
    while time.perf_counter() < until:
        started = time.perf_counter()
        try:
            response = await http.get(url)
        except httpx.HTTPError:
            errors.append(1)
            continue
        latencies.append(time.perf_counter() - started)
        if response.status_code != 200:
            errors.append(response.status_code)
        size = len(response.content)
    return size


async def _run(url: str, seconds: float, concurrency: int, headers: dict[str, str]) -> LoadResult:
    latencies: list[float] = []
    errors: list[int] = []
    # One client (one keep-alive connection) per poller, as independent pollers would be.
    # A single client with a pool of `concurrency` connections costs the harness about
    # twice the CPU per request: httpcore scans every pooled connection on each request.
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                httpx.AsyncClient(timeout=30.0, limits=limits, headers=headers)
            )
            for _ in range(concurrency)
        ]
        for http in clients:
            await http.get(url)  # open the connections and warm the server's caches
        started, cpu_started = time.perf_counter(), time.process_time()
        until = started + seconds
        sizes = await asyncio.gather(
            *(_client_loop(http, url, until, latencies, errors) for http in clients)
        )
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
    ordered = sorted(latencies) or [0.0]
    return LoadResult(
        requests=len(latencies),
        errors=len(errors),
        seconds=elapsed,
        p50_ms=statistics.median(ordered) * 1000,
        p99_ms=ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000,
        bytes_per_response=max(sizes),
        client_cpu_seconds=cpu,
    )


def status_load(
    url: str, seconds: float = 10.0, concurrency: int = 16, headers: dict[str, str] | None = None
) -> LoadResult:
    """GET `url` from `concurrency` concurrent clients for `seconds`."""
    return asyncio.run(_run(url, seconds, concurrency, headers or {}))
