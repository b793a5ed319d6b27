"""Publishing RequestReceived through a bus that may not be connected yet.

Ingest takes uploads while the broker is down (the outbox relay sends them later), so
the publisher sits on a `BusLink`, which connects in the background, and a publish
that cannot be confirmed in time fails fast instead of holding the upload.
"""

from __future__ import annotations

import asyncio

from imgpipe.contracts.bus import BusLink
from imgpipe.contracts.events import CloudEvent
from imgpipe.ingest.domain import PublishFailed


class EventPublisher:
    def __init__(self, link: BusLink, *, publish_timeout: float) -> None:
        self._link = link
        self._publish_timeout = publish_timeout

    @property
    def is_connected(self) -> bool:
        return self._link.is_connected

    async def publish(self, event: CloudEvent) -> None:
        """Publish with the broker's confirm, or raise PublishFailed within the timeout."""
        try:
            await asyncio.wait_for(self._link.publish(event), self._publish_timeout)
        except Exception as exc:  # not connected, timeout, closed channel, nack: unconfirmed
            raise PublishFailed(f"{type(exc).__name__}: {exc}") from exc
