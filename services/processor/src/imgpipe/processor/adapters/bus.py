"""The bus the handlers publish and send on, once the broker has answered."""

from __future__ import annotations

from collections.abc import Sequence

from imgpipe.contracts.bus import Bus
from imgpipe.contracts.events import CloudEvent


class LinkedBus:
    """A handlers.Publisher over the Bus of a BusLink.

    The processor starts while the broker is down; its link sets `bus` when it connects,
    before it declares the consumers, so a handler never runs without it."""

    def __init__(self) -> None:
        self.bus: Bus | None = None

    def _connected(self) -> Bus:
        if self.bus is None:
            raise RuntimeError("not connected to the broker yet")
        return self.bus

    async def publish(self, event: CloudEvent) -> None:
        await self._connected().publish(event)

    async def publish_many(self, events: Sequence[CloudEvent]) -> None:
        await self._connected().publish_many(events)

    async def send(self, queue_key: str, body: bytes, message_id: str) -> None:
        await self._connected().send(queue_key, body, message_id)
