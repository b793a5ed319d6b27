"""Every exchange and queue name, declared here and nowhere else (DESIGN.md, "Events")."""

from __future__ import annotations

from dataclasses import dataclass, field

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue

from imgpipe.contracts.events import ImageProcessed, RequestCompleted, RequestReceived

ALL_EVENT_KEYS = (
    RequestReceived.routing_key,
    ImageProcessed.routing_key,
    RequestCompleted.routing_key,
)


@dataclass(frozen=True)
class QueueSpec:
    """A durable quorum queue; `bindings` are routing keys on the events exchange."""

    name: str
    bindings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Topology:
    namespace: str = ""
    delivery_limit: int = 5
    queues: dict[str, QueueSpec] = field(init=False)

    def __post_init__(self) -> None:
        specs = {
            # processor: RequestReceived in, and its own per-image work queue (not public).
            "processor.requests": QueueSpec("processor.requests", (RequestReceived.routing_key,)),
            "processor.jobs": QueueSpec("processor.jobs"),
            "status": QueueSpec("status", ALL_EVENT_KEYS),
            "notifier": QueueSpec("notifier", ALL_EVENT_KEYS),
        }
        object.__setattr__(self, "queues", specs)

    def name(self, base: str) -> str:
        full = f"imgpipe.{base}"
        return f"{self.namespace}.{full}" if self.namespace else full

    @property
    def events_exchange(self) -> str:
        return self.name("events")

    @property
    def dead_letter_exchange(self) -> str:
        return self.name("dead-letter")

    @property
    def dead_letter_queue(self) -> str:
        return self.name("dead-letter")

    def queue_name(self, key: str) -> str:
        return self.name(self.queues[key].name)

    async def declare(self, channel: AbstractChannel) -> AbstractExchange:
        """Declare the whole topology (idempotent); returns the events exchange."""
        events = await channel.declare_exchange(
            self.events_exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        dlx = await channel.declare_exchange(
            self.dead_letter_exchange, aio_pika.ExchangeType.FANOUT, durable=True
        )
        dlq = await channel.declare_queue(
            self.dead_letter_queue, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await dlq.bind(dlx)
        for key in self.queues:
            await self.declare_queue(channel, key, events)
        return events

    async def declare_queue(
        self, channel: AbstractChannel, key: str, events: AbstractExchange | None = None
    ) -> AbstractQueue:
        spec = self.queues[key]
        queue = await channel.declare_queue(
            self.name(spec.name),
            durable=True,
            arguments={
                "x-queue-type": "quorum",
                "x-delivery-limit": self.delivery_limit,
                "x-dead-letter-exchange": self.dead_letter_exchange,
            },
        )
        if events is not None:
            for routing_key in spec.bindings:
                await queue.bind(events, routing_key)
        return queue

    async def delete(self, channel: AbstractChannel) -> None:
        """Remove everything this namespace declared (tests, tenant teardown)."""
        names = [self.queue_name(key) for key in self.queues] + [self.dead_letter_queue]
        for name in names:
            # Quorum queues refuse if_unused=True (540 NOT_IMPLEMENTED).
            await channel.queue_delete(name, if_unused=False, if_empty=False)
        for name in (self.events_exchange, self.dead_letter_exchange):
            await channel.exchange_delete(name)
