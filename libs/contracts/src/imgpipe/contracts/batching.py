"""Group writes that arrive together into one round trip.

The bus hands messages to handlers concurrently (up to the prefetch). Each handler
submits its item and waits for its result. The first item of a batch waits up to
`window` seconds for others (less once `max_batch` are waiting, or when `hurry` is
called); while one batch is being written the next items queue up and go together in
the following one. Handlers return (and the bus acks) only after their batch is written.

A batch that fails is retried one item at a time, so a bad item fails alone; a database
outage fails the whole batch at once, with the outage as the cause (the bus retries
such handlers in place, see bus.is_unavailable).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from imgpipe.contracts.bus import is_unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
# Writes a batch; returns one result per item, in order.
Write = Callable[[list[T]], Awaitable[Sequence[R]]]


class Batcher(Generic[T, R]):
    def __init__(
        self,
        write: Write[T, R],
        *,
        window: float = 0.0,
        max_batch: int = 200,
        name: str = "batches",
    ) -> None:
        self._write = write
        self._window = window
        self._max_batch = max_batch
        self._name = name
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._full = asyncio.Event()
        self._flushing: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        """Returns the item's result once its batch is written; raises if it could not be."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if len(self._pending) >= self._max_batch:
            self._full.set()
        if self._flushing is None or self._flushing.done():
            # Its own task: a handler cancelled mid-write must not strand the others.
            self._flushing = asyncio.create_task(self._flush_all(), name=self._name)
        return await future

    def hurry(self) -> None:
        """End the current wait now: someone waits on what is pending."""
        self._full.set()

    async def _flush_all(self) -> None:
        if self._window > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._full.wait(), self._window)
        while self._pending:
            self._full.clear()
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            await self._flush(batch)

    async def _flush(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        await write_batch(self._write, batch, self._name)


async def write_batch(
    write: Write[T, R], batch: list[tuple[T, asyncio.Future[R]]], name: str
) -> None:
    """Write `batch` and settle each item's future with its result: the failure policy
    of every batcher here. A batch that fails is retried one item at a time, so a bad
    item fails alone; a database outage fails the whole batch at once (one by one would
    wait out a server-selection timeout per item), with the outage as the cause, by
    which the bus retries such handlers in place."""
    try:
        results = await write([item for item, _ in batch])
    except Exception as exc:
        if len(batch) > 1 and not is_unavailable(exc):
            for one in batch:
                await write_batch(write, [one], name)
            return
        log.error("%s: writing %d items failed: %r", name, len(batch), exc)
        for _, future in batch:
            if not future.done():
                failure = RuntimeError(f"{name}: write failed")
                failure.__cause__ = exc
                future.set_exception(failure)
        return
    for (_, future), result in zip(batch, results, strict=True):
        if not future.done():  # a cancelled handler: its message is redelivered
            future.set_result(result)


class BatchWriter(Generic[T]):
    """A batcher that rests between writes, for a consumer whose items come steadily.

    The bus hands messages to handlers concurrently (up to the prefetch). Each handler
    submits its update and waits; while one bulk write is in flight the next updates queue
    up and go together in the following one. A lone update is written at once, a burst
    costs one round trip per batch instead of one per event.

    After each write the writer rests, so that more updates share the next one. A write
    has a large fixed cost (SecantusDB: ~1 ms of CPU for one outcome, ~3 ms for thirty), so
    at the pipeline's pace (about 60 outcomes a second, a few at a time) writing as soon as
    anything waits cost ~0.3 ms of database CPU per image, and resting half a second cuts
    that to ~0.1 ms. The rest is `min_rest`, or `rest_ratio` times the write's duration when
    that is longer (at most `max_rest`): a slow write (a busy database, a large document of
    the previous layout) rests longer, which caps the writer's share of the database at
    1 / (1 + rest_ratio). A rest ends early once `flush_at` updates wait (keep it below the
    prefetch, or the broker stops delivering while the writer rests), or when an urgent
    update arrives (`urgent(item)`: by default the item's `urgent` attribute), such as the
    one that makes a request visible or final, which a user is waiting to read.
    """

    def __init__(
        self,
        write: Callable[[list[T]], Awaitable[None]],
        *,
        name: str = "batch-writer",
        max_batch: int = 500,
        rest_ratio: float = 30.0,
        min_rest: float = 0.5,
        max_rest: float = 3.0,
        flush_at: int = 200,
        urgent: Callable[[T], bool] = lambda item: bool(getattr(item, "urgent", False)),
    ) -> None:
        self._write = _no_results(write)
        self._name = name
        self._max_batch = max_batch
        self._rest_ratio = rest_ratio
        self._min_rest = min_rest
        self._max_rest = max_rest
        self._flush_at = flush_at
        self._urgent = urgent
        self._urgent_waiting = False
        self._resting = False
        self._pending: list[tuple[T, asyncio.Future[None]]] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self._name)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for _, future in self._pending:  # unacked: the broker redelivers them
            if not future.done():
                future.set_exception(RuntimeError("writer closed"))
        self._pending.clear()

    async def submit(self, item: T) -> None:
        """Returns once the item is stored; raises if it could not be."""
        if self._task is None or self._task.done():
            raise RuntimeError("writer is not running")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        self._urgent_waiting |= self._urgent(item)
        # A resting writer wakes only for what ends its rest: waking it for every item
        # (hundreds a second) only to sleep again cost a timer and a task each.
        if not self._resting or self._urgent_waiting or len(self._pending) >= self._flush_at:
            self._wakeup.set()
        await future

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                self._urgent_waiting = any(self._urgent(item) for item, _ in self._pending)
                started = time.monotonic()
                await self._flush(batch)
                took = time.monotonic() - started
                await self._rest(max(self._min_rest, min(self._max_rest, self._rest_ratio * took)))

    async def _rest(self, seconds: float) -> None:
        """Sleep `seconds`, or less once `flush_at` updates or an urgent one wait."""
        if len(self._pending) >= self._flush_at or self._urgent_waiting:
            return
        self._wakeup.clear()
        self._resting = True
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), seconds)
        finally:
            self._resting = False

    async def _flush(self, batch: list[tuple[T, asyncio.Future[None]]]) -> None:
        await write_batch(self._write, batch, self._name)


def _no_results(write: Callable[[list[T]], Awaitable[None]]) -> Write[T, None]:
    async def written(items: list[T]) -> list[None]:
        await write(items)
        return [None] * len(items)

    return written
