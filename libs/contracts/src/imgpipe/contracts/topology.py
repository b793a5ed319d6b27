"""Every exchange and queue name, declared here and nowhere else.

See docs/architecture.md, "Events".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue

from imgpipe.contracts.events import (
    CancelRequested,
    ImageProcessed,
    RequestCancelled,
    RequestCompleted,
    RequestDeleted,
    RequestReceived,
    RetryRequested,
    RetryStarted,
)

# Delay queues of the processor's parked images, in seconds: a message waits its queue's
# time, then goes back to "processor.jobs". A queue per delay, not a per-message TTL on
# one queue: RabbitMQ expires messages only at the head of a queue, so a short delay
# queued behind a long one would wait for it. Doubling steps reach any wait in a few hops.
RETRY_DELAYS = (5, 10, 20, 40, 80, 160, 320)

# What a request's state is made of: the read side (status, notifier) follows these.
LIFECYCLE_KEYS = (
    RequestReceived.routing_key,
    ImageProcessed.routing_key,
    RequestCompleted.routing_key,
    RequestCancelled.routing_key,
    RetryStarted.routing_key,
    RequestDeleted.routing_key,
)
# Commands as events: ingest asks, the processor acts.
COMMAND_KEYS = (CancelRequested.routing_key, RetryRequested.routing_key)
ALL_EVENT_KEYS = LIFECYCLE_KEYS + COMMAND_KEYS
# How a run ends or starts again: ingest follows these to answer cancel and retry.
RUN_KEYS = (
    RequestCompleted.routing_key,
    RequestCancelled.routing_key,
    RetryStarted.routing_key,
)


def retry_queue_key(seconds: int) -> str:
    return f"processor.retry.{seconds}s"


@dataclass(frozen=True)
class QueueSpec:
    """A durable quorum queue; `bindings` are routing keys on the events exchange.

    A delay queue has no consumer: each message stays `delay` seconds, then is
    dead-lettered (at least once) into the queue `returns_to`."""

    name: str
    bindings: tuple[str, ...] = ()
    delay: int | None = None
    returns_to: str | None = None

    @property
    def consumed(self) -> bool:
        """A service consumes it (every queue but the delay queues)."""
        return self.delay is None


@dataclass(frozen=True)
class Topology:
    namespace: str = ""
    delivery_limit: int = 5
    queues: dict[str, QueueSpec] = field(init=False)

    def __post_init__(self) -> None:
        specs = {
            # processor: requests and what is asked of them in, and its own per-image
            # work queue (not public).
            "processor.requests": QueueSpec(
                "processor.requests",
                (RequestReceived.routing_key, *COMMAND_KEYS, RequestDeleted.routing_key),
            ),
            "processor.jobs": QueueSpec("processor.jobs"),
            **{
                retry_queue_key(seconds): QueueSpec(
                    retry_queue_key(seconds), delay=seconds, returns_to="processor.jobs"
                )
                for seconds in RETRY_DELAYS
            },
            "status": QueueSpec("status", LIFECYCLE_KEYS),
            "notifier": QueueSpec("notifier", LIFECYCLE_KEYS),
            "ingest": QueueSpec("ingest", RUN_KEYS),
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

    def retry_queue_for(self, seconds: float) -> tuple[str, int]:
        """The delay queue to park a message in for about `seconds`: the longest delay
        not past it (the shortest if all are), and that delay. The consumer waits out
        the rest, or parks the message again."""
        fitting = [delay for delay in RETRY_DELAYS if delay <= seconds]
        delay = max(fitting) if fitting else RETRY_DELAYS[0]
        return retry_queue_key(delay), delay

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
            self.name(spec.name), durable=True, arguments=self._arguments(spec)
        )
        if events is not None:
            for routing_key in spec.bindings:
                await queue.bind(events, routing_key)
        return queue

    def _arguments(self, spec: QueueSpec) -> dict[str, Any]:
        if spec.delay is None or spec.returns_to is None:
            return {
                "x-queue-type": "quorum",
                "x-delivery-limit": self.delivery_limit,
                "x-dead-letter-exchange": self.dead_letter_exchange,
            }
        return {
            "x-queue-type": "quorum",
            "x-message-ttl": spec.delay * 1000,
            # Through the default exchange, whose routing keys are queue names.
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": self.queue_name(spec.returns_to),
            # Kept until the target queue confirms it (needs reject-publish overflow).
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }

    async def delete(self, channel: AbstractChannel) -> None:
        """Remove everything this namespace declared (tests, tenant teardown)."""
        names = [self.queue_name(key) for key in self.queues] + [self.dead_letter_queue]
        for name in names:
            # Quorum queues refuse if_unused=True (540 NOT_IMPLEMENTED).
            await channel.queue_delete(name, if_unused=False, if_empty=False)
        for name in (self.events_exchange, self.dead_letter_exchange):
            await channel.exchange_delete(name)
