"""Letting the handlers in progress finish when the processor stops."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class Drain:
    """Tracks handlers in progress so shutdown can let them finish.

    Bus has no way to cancel a consumer, so after `stop` a newly delivered message is
    parked, never settled: closing the connection hands it back to the broker."""

    def __init__(self) -> None:
        self._stopping = False
        self._running: set[asyncio.Task[object]] = set()
        self._parked: set[asyncio.Task[object]] = set()

    def wrap(self, handler: Callable[[T], Awaitable[None]]) -> Callable[[T], Awaitable[None]]:
        async def wrapped(item: T) -> None:
            task = asyncio.current_task()
            assert task is not None
            if self._stopping:
                self._parked.add(task)
                await asyncio.Event().wait()
            self._running.add(task)
            try:
                await handler(item)
            finally:
                self._running.discard(task)

        return wrapped

    async def stop(self, grace: float) -> None:
        self._stopping = True
        if self._running:
            _, pending = await asyncio.wait(set(self._running), timeout=grace)
            if pending:
                log.warning("%d jobs still running at shutdown: redelivered", len(pending))

    async def cancel_rest(self) -> None:
        rest = self._running | self._parked
        for task in rest:
            task.cancel()
        await asyncio.gather(*rest, return_exceptions=True)
