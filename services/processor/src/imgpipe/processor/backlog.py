"""Backpressure between downloads and the codec.

A processor holds many images at once (bootstrap.prefetch): most of them wait for their
host, a retry or their turn, holding no bytes. The ones that have arrived wait for a
pool worker holding their bytes, and on a fast host they arrive faster than the codec
takes them. `Backlog` counts those; while it is full, no new download starts, so
memory stays bounded by what the codec can take rather than by the prefetch.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class Backlog:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._count = 0
        self._changed = asyncio.Condition()

    @property
    def count(self) -> int:
        return self._count

    async def room(self) -> None:
        """Wait until fewer than `limit` downloaded images wait for the codec."""
        if self._count < self.limit:
            return
        async with self._changed:
            await self._changed.wait_for(lambda: self._count < self.limit)

    @asynccontextmanager
    async def holding(self) -> AsyncIterator[None]:
        """Count one downloaded image until its bytes are handed over and done with."""
        self._count += 1
        try:
            yield
        finally:
            self._count -= 1
            async with self._changed:
                self._changed.notify()
