"""The one event tap of the in-process tests: a queue of the test's own, bound to the
events exchange, that hears what a service publishes (as an outside system would)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import aio_pika

from imgpipe.contracts.bus import Bus
from imgpipe.contracts.events import (
    AnyEvent,
    CloudEvent,
    Counts,
    RequestCompleted,
    parse_event,
)
from imgpipe.contracts.settings import Settings
from imgpipe.contracts.topology import ALL_EVENT_KEYS, Topology

SENTINEL = "tap-sentinel"
WAIT = 120.0  # the longest a test waits for one event


class EventTap:
    """Every event heard on the tap's routing keys, in order; `bus` publishes too.

    `flush` publishes a sentinel RequestCompleted and reads up to it: the queue is FIFO,
    so everything published (and confirmed) before the call has then been heard."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.events: list[AnyEvent] = []
        self._inbox: asyncio.Queue[AnyEvent] = asyncio.Queue()

    async def listen(self, routing_keys: Sequence[str]) -> None:
        queue = await self.bus.channel.declare_queue(exclusive=True, auto_delete=True)
        for key in {*routing_keys, RequestCompleted.routing_key}:  # the sentinel's too
            await queue.bind(self.bus.events, key)

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            await self._inbox.put(parse_event(message.body))

        await queue.consume(on_message, no_ack=True)

    async def next(self) -> AnyEvent:
        """The next event heard (the sentinel aside)."""
        while True:
            event = await asyncio.wait_for(self._inbox.get(), WAIT)
            self.events.append(event)
            if event.data.request_id != SENTINEL:
                return event

    async def until(self, request_id: str, event_type: type, count: int = 1) -> AnyEvent:
        """Read until the `count`-th event of this type for this request arrives."""
        while True:
            event = await self.next()
            mine = isinstance(event.data, event_type) and event.data.request_id == request_id
            if mine and len(self.of(request_id, event_type)) >= count:
                return event

    async def flush(self) -> list[AnyEvent]:
        data = RequestCompleted(
            request_id=SENTINEL,
            status="error",
            counts=Counts(total=0, ok=0, failed=0),
            completed_at=datetime.now(UTC),
        )
        await self.bus.publish(CloudEvent.wrap(data, source="test", id=SENTINEL))
        while True:
            event = await asyncio.wait_for(self._inbox.get(), WAIT)
            if event.data.request_id == SENTINEL:
                return list(self.events)
            self.events.append(event)

    def of(self, request_id: str, event_type: type) -> list[AnyEvent]:
        return [
            e
            for e in self.events
            if isinstance(e.data, event_type) and e.data.request_id == request_id
        ]


@asynccontextmanager
async def event_tap(
    settings: Settings, routing_keys: Sequence[str] = ALL_EVENT_KEYS
) -> AsyncIterator[EventTap]:
    """A tap on the test's namespace; declares the topology first, so it can be opened
    before any service runs."""
    bus = await Bus.connect(
        settings.amqp_url, Topology(settings.namespace, settings.delivery_limit)
    )
    try:
        tap = EventTap(bus)
        await tap.listen(routing_keys)
        yield tap
    finally:
        await bus.close()
