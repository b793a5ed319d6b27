"""Group concurrent writes into one bulk write.

The bus hands messages to handlers concurrently (up to the prefetch). Each handler
submits its update and waits; while one bulk write is in flight the next updates queue
up and go together in the following one. No timer: a lone update is written at once,
a burst costs one round trip per batch instead of one per event.
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


class BatchWriter(Generic[T]):
    def __init__(self, write: Write[T], *, max_batch: int = 500) -> None:
        self._write = write
        self._max_batch = max_batch
        self._pending: list[tuple[T, asyncio.Future[None]]] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="status-batch-writer")

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
        self._wakeup.set()
        await future

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                await self._flush(batch)

    async def _flush(self, batch: list[tuple[T, asyncio.Future[None]]]) -> None:
        try:
            await self._write([item for item, _ in batch])
        except Exception as exc:
            if len(batch) == 1 or is_unavailable(exc):
                # The database being down is no update's fault: fail the batch at once
                # (one by one would wait out a server-selection timeout per update).
                # Handlers get the cause, so the bus can tell "unavailable" and retry.
                _settle(batch, error=exc)
                log.error("read-model write of %d updates failed: %s", len(batch), exc)
                return
            # Retry one by one so a bad update fails alone, not the whole batch.
            for one in batch:
                await self._flush([one])
        else:
            _settle(batch)


def _settle(
    batch: list[tuple[object, asyncio.Future[None]]], *, error: BaseException | None = None
) -> None:
    for _, future in batch:
        if future.done():  # the handler was cancelled meanwhile
            continue
        if error is not None:
            failure = RuntimeError("read-model write failed")
            failure.__cause__ = error
            future.set_exception(failure)
        else:
            future.set_result(None)
