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
        try:
            results = await self._write([item for item, _ in batch])
        except Exception as exc:
            if len(batch) > 1 and not is_unavailable(exc):
                for one in batch:  # one by one, so a bad item fails alone
                    await self._flush([one])
                return
            log.error("%s: writing %d items failed: %r", self._name, len(batch), exc)
            for _, future in batch:
                if not future.done():
                    failure = RuntimeError(f"{self._name}: write failed")
                    failure.__cause__ = exc  # the bus tells "database unavailable" by it
                    future.set_exception(failure)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():  # a cancelled handler: its message is redelivered
                future.set_result(result)
