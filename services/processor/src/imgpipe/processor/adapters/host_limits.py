"""How many downloads each image host gets at once, and when it may be asked again.

One `HostLimits` per processor process; a host is an origin (scheme, host, port). Each
starts with `ceiling` downloads in flight (IMGPIPE_PER_HOST_CONNECTIONS, 6 by default,
what browsers open per host over HTTP/1.1) and adapts, as TCP's congestion control
does (additive increase, multiplicative decrease):

- an answer that says "too many" halves the host's limit, once per round of downloads:
  answers to downloads started before the last cut do not cut it again, or one burst
  of 429s would take the limit to 1. A 429 or a 503 with Retry-After says it for sure;
  a bare 503, which real hosts also send for a hiccup, says it when it follows another
  refusal;
- every successful answer raises it by 1/limit (one download more per round of
  successes), back up to the ceiling;
- a Retry-After on such an answer pauses the whole host until then: no new download of
  that host starts meanwhile, whichever image it is for.

A slow or throttling host holds only its own downloads: every host has its own count,
its own pause and its own waiters.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx

Clock = Callable[[], float]


def origin(url: str) -> str:
    """`scheme://host:port` of `url`: what one limit covers."""
    parsed = httpx.URL(url)
    port = parsed.port or {"http": 80, "https": 443}.get(parsed.scheme, 0)
    return f"{parsed.scheme}://{parsed.host}:{port}"


class HostPaused(Exception):
    """The host asked for a pause longer than the caller will wait in place."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"host paused for {seconds:.1f} s")
        self.seconds = seconds


class HostBusy(Exception):
    """No slot of the host came free within the time the caller will wait in place."""


@dataclass
class _Host:
    limit: float
    in_flight: int = 0
    paused_until: float = 0.0
    cut_at: float = float("-inf")  # when the limit was last halved
    waiting: int = 0
    retries_waiting: int = 0
    refused_last: bool = False  # the host's last answer was a refusal (429, 503)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)


@dataclass(frozen=True)
class Slot:
    """One download in flight to `origin`, started at `started` (the clock's time)."""

    origin: str
    started: float


class HostLimits:
    def __init__(self, ceiling: int, clock: Clock = time.monotonic) -> None:
        self.ceiling = ceiling
        self._clock = clock
        self._hosts: dict[str, _Host] = {}

    def limit(self, origin: str) -> int:
        """Downloads `origin` may have in flight at once now."""
        return int(self._host(origin).limit)

    def paused_for(self, origin: str) -> float:
        """Seconds until `origin` may be asked again (0 when it may be now)."""
        return max(0.0, self._host(origin).paused_until - self._clock())

    @asynccontextmanager
    async def slot(
        self,
        origin: str,
        max_wait: float,
        *,
        max_queue: float | None = None,
        retry: bool = False,
    ) -> AsyncIterator[Slot]:
        """Hold one of `origin`'s download slots.

        Raises HostPaused rather than wait out a host's pause longer than `max_wait`
        seconds, and HostBusy when no slot came free within `max_queue` seconds (a slow
        host with many images queued). A `retry` goes before first attempts: its image
        has waited once already, and its job waits for it."""
        host = self._host(origin)
        async with host.changed:
            host.waiting += 1
            host.retries_waiting += retry
            try:
                async with asyncio.timeout(max_queue):
                    await self._until_free(host, max_wait, retry)
            except TimeoutError:
                raise HostBusy(f"no download slot of {origin} within {max_queue:g} s") from None
            finally:
                host.waiting -= 1
                host.retries_waiting -= retry
            host.in_flight += 1
        try:
            yield Slot(origin, self._clock())
        finally:
            async with host.changed:
                host.in_flight -= 1
                host.changed.notify_all()
                self._forget_if_idle(origin, host)

    async def _until_free(self, host: _Host, max_wait: float, retry: bool) -> None:
        while True:
            pause = host.paused_until - self._clock()
            if pause > max_wait:
                raise HostPaused(pause)
            if pause > 0:
                await _wait(host.changed, pause)
            elif host.in_flight < int(host.limit) and (retry or not host.retries_waiting):
                return
            else:
                await host.changed.wait()

    def succeeded(self, slot: Slot) -> None:
        host = self._host(slot.origin)
        host.refused_last = False
        host.limit = min(float(self.ceiling), host.limit + 1 / host.limit)

    def throttled(self, slot: Slot, retry_after: float | None, *, certain: bool = True) -> None:
        """The host refused the download in `slot` ("too many", or maybe a hiccup).

        A `certain` refusal (a 429, or a 503 with Retry-After) halves the limit. An
        uncertain one (a bare 503) halves it only when the host's previous answer was a
        refusal too: one among successes is a hiccup, which is retried without slowing
        the host down, while a host in trouble refuses again and again."""
        host = self._host(slot.origin)
        strained = certain or host.refused_last
        host.refused_last = True
        if strained and slot.started >= host.cut_at:
            host.limit = max(1.0, host.limit / 2)
            host.cut_at = self._clock()
        if retry_after:
            host.paused_until = max(host.paused_until, self._clock() + retry_after)

    def _forget_if_idle(self, origin: str, host: _Host) -> None:
        """A host back to its defaults holds nothing worth keeping: a process that met
        a million hosts must not keep a million entries."""
        idle = host.in_flight == 0 and host.waiting == 0
        settled = (
            host.limit >= self.ceiling
            and host.paused_until <= self._clock()
            and not host.refused_last
        )
        if idle and settled and self._hosts.get(origin) is host:
            del self._hosts[origin]

    def _host(self, origin: str) -> _Host:
        host = self._hosts.get(origin)
        if host is None:
            host = self._hosts[origin] = _Host(float(self.ceiling))
        return host


async def _wait(condition: asyncio.Condition, seconds: float) -> None:
    """Wait for a change on `condition` (held) or `seconds`, whichever comes first."""
    try:
        async with asyncio.timeout(seconds):
            await condition.wait()
    except TimeoutError:
        pass
