"""Group writes that arrive together into one round trip.

The bus hands events to handlers concurrently (up to the prefetch). Each handler
submits its item and waits. The first item of a batch waits up to `window` seconds for
others (less once `max_batch` are waiting); while one batch is being written the next
items queue up and go together in the following one. SecantusDB spends ~0.5 ms per
round trip on top of its per-document work, and events trickle in one at a time while
images are processed, so without the wait most batches held one or two events.
Handlers return (and the bus acks) only after their batch is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from imgpipe.contracts.bus import is_unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
Write = Callable[[list[T]], Awaitable[None]]


class Batcher(Generic[T]):
    def __init__(self, write: Write[T], *, window: float = 0.0, max_batch: int = 200) -> None:
        self._write = write
        self._window = window
        self._max_batch = max_batch
        self._pending: list[tuple[T, asyncio.Future[None]]] = []
        self._full = asyncio.Event()
        self._flushing: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> None:
        """Returns once the item's batch is written; raises if it could not be."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if len(self._pending) >= self._max_batch:
            self._full.set()
        if self._flushing is None or self._flushing.done():
            # Its own task: a handler cancelled mid-write must not strand the others.
            self._flushing = asyncio.create_task(self._flush_all(), name="notifier-batches")
        await future

    def hurry(self) -> None:
        """End the current wait now: someone waits on what is pending (a final webhook
        waits for its request's last images to be stored)."""
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

    async def _flush(self, batch: list[tuple[T, asyncio.Future[None]]]) -> None:
        try:
            await self._write([item for item, _ in batch])
        except Exception as exc:
            if len(batch) > 1 and not is_unavailable(exc):
                for one in batch:  # one by one, so a bad item fails alone
                    await self._flush([one])
                return
            log.error("write of %d events failed: %r", len(batch), exc)
            for _, future in batch:
                if not future.done():
                    failure = RuntimeError("write failed")
                    failure.__cause__ = exc  # the bus tells "database unavailable" by it
                    future.set_exception(failure)
            return
        for _, future in batch:
            if not future.done():  # a cancelled handler: its event is redelivered
                future.set_result(None)
