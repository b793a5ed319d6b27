"""Backpressure: no new download while the codec has a full backlog."""

from __future__ import annotations

import asyncio

from imgpipe.processor.backlog import Backlog


async def test_room_waits_while_the_backlog_is_full() -> None:
    backlog = Backlog(2)
    release = asyncio.Event()

    async def downloaded() -> None:
        async with backlog.holding():
            await release.wait()

    holders = [asyncio.create_task(downloaded()) for _ in range(2)]
    await asyncio.sleep(0)
    assert backlog.count == 2
    waiting = asyncio.create_task(backlog.room())
    await asyncio.sleep(0.01)
    assert not waiting.done()  # a new download would wait
    release.set()
    await asyncio.wait_for(waiting, 1)
    await asyncio.gather(*holders)
    assert backlog.count == 0
    await asyncio.wait_for(backlog.room(), 1)  # an empty backlog never waits
