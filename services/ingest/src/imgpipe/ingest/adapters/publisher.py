"""Publishing through a Bus that may not be there yet.

Ingest must take uploads while the broker is down (the outbox relay sends them
later), so the app starts without a broker and keeps trying to connect in the
background. Once connected, aio-pika's robust connection handles reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from imgpipe.contracts.bus import Bus
from imgpipe.contracts.events import CloudEvent
from imgpipe.ingest.domain import PublishFailed

log = logging.getLogger(__name__)


class EventPublisher:
    def __init__(
        self,
        connect: Callable[[], Awaitable[Bus]],
        *,
        publish_timeout: float,
        retry_interval: float,
    ) -> None:
        self._connect = connect
        self._publish_timeout = publish_timeout
        self._retry_interval = retry_interval
        self._bus: Bus | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def is_connected(self) -> bool:
        return self._bus is not None and self._bus.is_connected

    async def start(self) -> None:
        """Connect now if the broker answers; otherwise keep trying in the background."""
        if not await self._try_connect():
            self._task = asyncio.create_task(self._keep_connecting(), name="ingest-bus-connect")

    async def publish(self, event: CloudEvent) -> None:
        """Publish with the broker's confirm, or raise PublishFailed within the timeout."""
        if self._bus is None:
            raise PublishFailed("not connected to the broker yet")
        try:
            await asyncio.wait_for(self._bus.publish(event), self._publish_timeout)
        except Exception as exc:  # timeout, closed channel, nack: all mean "not confirmed"
            raise PublishFailed(f"{type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._bus is not None:
            await self._bus.close()

    async def _keep_connecting(self) -> None:
        while not await self._try_connect():  # noqa: ASYNC110 - polling a remote broker
            await asyncio.sleep(self._retry_interval)

    async def _try_connect(self) -> bool:
        try:
            self._bus = await self._connect()
        except Exception as exc:
            log.warning("broker unavailable (%s); uploads are kept in the outbox", exc)
            return False
        log.info("connected to the broker")
        return True
