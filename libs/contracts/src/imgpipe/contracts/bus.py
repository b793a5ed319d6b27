"""A thin bus over aio-pika: confirmed persistent publishes and acked consumers.

Delivery is at least once. A handler that raises gets its message requeued; the
quorum queue's delivery limit then dead-letters a message that keeps failing. A
message that cannot be parsed at all goes straight to the dead-letter queue.

A handler that fails because the database is unreachable is not the message's fault:
it is retried in place with backoff (the message stays unacked) instead of burning
delivery attempts, so a database outage never dead-letters work in flight.

Connections are robust: aio-pika reconnects and re-declares the exchanges, queues,
QoS and consumers of the publisher-confirm channel. Each connection carries a
client-provided name, "imgpipe/<namespace>/<service>/<host>:<pid>", which shows up in
the broker's tools so an operator (or a test) can find one service's connections.

Every message carries the trace it belongs to (imgpipe.contracts.tracing): an event as
its `traceparent` attribute (the current span's when the event names none), a private
work item as a `traceparent` header. Each handling runs in a consumer span under it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from opentelemetry.trace import SpanKind
from pydantic import ValidationError
from pymongo.errors import ConnectionFailure

from imgpipe.contracts.events import CONTENT_TYPE, AnyEvent, CloudEvent, parse_event
from imgpipe.contracts.logs import request_context
from imgpipe.contracts.metrics import (
    DEAD_LETTERED,
    EVENTS_CONSUMED,
    EVENTS_PUBLISHED,
    HANDLER_FAILURES,
)
from imgpipe.contracts.service import keep_trying
from imgpipe.contracts.topology import Topology
from imgpipe.contracts.tracing import TRACEPARENT, current_traceparent, span

log = logging.getLogger(__name__)

EventHandler = Callable[[AnyEvent], Awaitable[None]]
RawHandler = Callable[[AbstractIncomingMessage], Awaitable[None]]

# While the database is unreachable a handler is retried in place, waiting this long
# between attempts (doubling up to the cap). After UNAVAILABLE_MAX_WAIT in all the
# message is requeued, which costs one delivery attempt.
UNAVAILABLE_FIRST_DELAY = 0.5
UNAVAILABLE_MAX_DELAY = 5.0
UNAVAILABLE_MAX_WAIT = 300.0


class Bus:
    def __init__(
        self,
        connection: AbstractRobustConnection,
        channel: AbstractRobustChannel,
        events: AbstractExchange,
        topology: Topology,
    ) -> None:
        self.connection = connection
        self.channel = channel
        self.events = events
        self.topology = topology

    @classmethod
    async def connect(
        cls, url: str, topology: Topology, *, prefetch: int = 16, service: str = ""
    ) -> Bus:
        connection = await aio_pika.connect_robust(
            url,
            client_properties={
                "product": "imgpipe",
                "connection_name": connection_name(topology.namespace, service),
            },
        )
        channel = await connection.channel(publisher_confirms=True)
        await channel.set_qos(prefetch_count=prefetch)
        events = await topology.declare(channel)
        return cls(connection, channel, events, topology)

    @property
    def is_connected(self) -> bool:
        """False while the robust connection is down or being restored."""
        return (
            not self.connection.is_closed
            and self.connection.connected.is_set()
            and not self.channel.is_closed
        )

    async def close(self) -> None:
        await self.connection.close()

    # Publishing -----------------------------------------------------------------

    async def publish(self, event: CloudEvent[Any]) -> None:
        """Publish one event and wait for the broker's confirm."""
        if event.traceparent is None and (traceparent := current_traceparent()):
            event = event.model_copy(update={"traceparent": traceparent})
        await self.events.publish(
            _message(event.to_bytes(), event.id, traceparent=event.traceparent),
            routing_key=event.routing_key,
        )
        EVENTS_PUBLISHED.labels(type=event.type).inc()

    async def publish_many(self, events: Iterable[CloudEvent[Any]]) -> None:
        """Publish concurrently: confirms in flight together are ~3x cheaper than in a loop."""
        await asyncio.gather(*(self.publish(event) for event in events))

    async def send(self, queue_key: str, body: bytes, message_id: str) -> None:
        """Send a private work item straight to one of the topology's queues."""
        await self.channel.default_exchange.publish(
            _message(
                body, message_id, content_type="application/json", traceparent=current_traceparent()
            ),
            routing_key=self.topology.queue_name(queue_key),
        )

    # Consuming ------------------------------------------------------------------

    async def consume_events(self, queue_key: str, handler: EventHandler) -> None:
        """Consume CloudEvents from a queue; ack only after the handler stored its work."""

        async def on_message(message: AbstractIncomingMessage) -> None:
            try:
                event = parse_event(message.body)
            except (ValidationError, ValueError):
                log.error(
                    "unparseable event %s on %s: dead-lettered", message.message_id, queue_key
                )
                await message.reject(requeue=False)
                DEAD_LETTERED.labels(queue=queue_key).inc()
                return
            attributes = {"request_id": event.subject, "event_type": event.type}
            # The event's own attribute first: the header is only imgpipe's copy of it.
            parent = event.traceparent or _header_traceparent(message)
            with (
                request_context(event.subject),
                span(
                    f"{queue_key} process",
                    parent=parent,
                    kind=SpanKind.CONSUMER,
                    attributes=attributes,
                ),
            ):
                await handler(event)
            EVENTS_CONSUMED.labels(queue=queue_key, type=event.type).inc()

        await self.consume(queue_key, on_message, traced=False)

    async def consume(self, queue_key: str, handler: RawHandler, *, traced: bool = True) -> None:
        """Consume raw messages; `traced`: each handling is a consumer span under the
        message's `traceparent` header."""
        queue = await self.topology.declare_queue(self.channel, queue_key, self.events)
        if traced:
            handler = _traced(queue_key, handler)

        async def on_message(message: AbstractIncomingMessage) -> None:
            try:
                handled = await self._handle(queue_key, handler, message)
            except asyncio.CancelledError:
                await _settle(message.nack(requeue=True))
                raise
            except Exception:
                log.exception(
                    "handler failed for %s on %s; requeued", message.message_id, queue_key
                )
                HANDLER_FAILURES.labels(queue=queue_key).inc()
                await _settle(message.nack(requeue=True))
            else:
                if handled and not message.processed:  # the handler may have settled it
                    await _settle(message.ack())

        await queue.consume(on_message)

    async def _handle(
        self, queue_key: str, handler: RawHandler, message: AbstractIncomingMessage
    ) -> bool:
        """Run the handler, retrying in place while the database is unreachable.

        Returns False when the delivery went void meanwhile (the channel closed: the
        broker redelivers the message), so there is nothing left to settle."""
        delay = UNAVAILABLE_FIRST_DELAY
        give_up = time.monotonic() + UNAVAILABLE_MAX_WAIT
        while True:
            try:
                await handler(message)
                return True
            except Exception as exc:
                if not is_unavailable(exc) or time.monotonic() + delay > give_up:
                    raise
                log.warning(
                    "database unavailable handling %s on %s (%s); retrying in %.1fs",
                    message.message_id,
                    queue_key,
                    type(exc).__name__,
                    delay,
                )
            if await self._closed_within(delay) or _delivery_void(message):
                return False
            delay = min(delay * 2, UNAVAILABLE_MAX_DELAY)

    async def _closed_within(self, seconds: float) -> bool:
        """Sleep, but wake at once if the bus is closed (shutdown must not wait)."""
        closed = asyncio.ensure_future(self.connection.closed())
        try:
            await asyncio.wait({closed}, timeout=seconds)
        finally:
            closed.cancel()
        return self.connection.is_closed


def is_unavailable(exc: BaseException) -> bool:
    """True when `exc` (or what caused it) says the database could not be reached."""
    seen: BaseException | None = exc
    for _ in range(10):  # causes form a short chain; never loop on a cycle
        if seen is None:
            return False
        if isinstance(seen, ConnectionFailure):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def connection_name(namespace: str, service: str = "") -> str:
    """The client-provided name the broker shows for a connection."""
    where = f"{socket.gethostname()}:{os.getpid()}"
    return f"imgpipe/{namespace or '-'}/{service or 'client'}/{where}"


def _delivery_void(message: AbstractIncomingMessage) -> bool:
    channel = getattr(message, "channel", None)
    return channel is None or channel.is_closed


def _message(
    body: bytes,
    message_id: str,
    content_type: str = CONTENT_TYPE,
    traceparent: str | None = None,
) -> aio_pika.Message:
    return aio_pika.Message(
        body,
        message_id=message_id,
        content_type=content_type,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        headers={TRACEPARENT: traceparent} if traceparent else None,
    )


def _header_traceparent(message: AbstractIncomingMessage) -> str | None:
    value = (message.headers or {}).get(TRACEPARENT)
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    return value if isinstance(value, str) else None


def _traced(queue_key: str, handler: RawHandler) -> RawHandler:
    async def traced(message: AbstractIncomingMessage) -> None:
        parent = _header_traceparent(message)
        with span(f"{queue_key} process", parent=parent, kind=SpanKind.CONSUMER):
            await handler(message)

    return traced


async def _settle(operation: Awaitable[None]) -> None:
    """Ack/nack may race a lost connection; the broker then redelivers, which is fine."""
    try:
        await operation
    except Exception as exc:  # channel closed: message will be redelivered
        log.warning("could not settle message: %s", exc)


class NotConnected(ConnectionError):
    """The broker has not answered yet."""


class BusLink:
    """A Bus that may not be there yet: a service starts while the broker is down.

    `start` connects now if the broker answers, else keeps trying in the background
    (service.keep_trying); `on_connect` runs once connected (declare consumers). After
    that aio-pika's robust connection handles reconnects. `bus` is None until then.

    It publishes and sends like a Bus, so handlers can be built before the broker
    answers; before then a publish raises NotConnected. Consumers are declared only
    once connected, so a handler that runs always finds the bus there."""

    def __init__(
        self,
        connect: Callable[[], Awaitable[Bus]],
        on_connect: Callable[[Bus], Awaitable[None]] | None = None,
        retry_interval: float = 2.0,
    ) -> None:
        self._connect = connect
        self._on_connect = on_connect
        self._retry_interval = retry_interval
        self.bus: Bus | None = None
        self._task: asyncio.Task[object] | None = None

    @property
    def is_connected(self) -> bool:
        return self.bus is not None and self.bus.is_connected

    async def start(self) -> None:
        try:
            await self._link()
        except Exception as exc:
            log.warning("broker unavailable at start-up (%s); connecting in the background", exc)
            self._task = keep_trying(self._link, "connecting to the broker", self._retry_interval)

    async def publish(self, event: CloudEvent[Any]) -> None:
        await self._connected().publish(event)

    async def publish_many(self, events: Iterable[CloudEvent[Any]]) -> None:
        await self._connected().publish_many(events)

    async def send(self, queue_key: str, body: bytes, message_id: str) -> None:
        await self._connected().send(queue_key, body, message_id)

    def _connected(self) -> Bus:
        if self.bus is None:
            raise NotConnected("not connected to the broker yet")
        return self.bus

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.bus is not None:
            await self.bus.close()

    async def _link(self) -> None:
        bus = await self._connect()
        self.bus = bus  # before the consumers: their handlers publish through the link
        try:
            if self._on_connect is not None:
                await self._on_connect(bus)
        except BaseException:
            self.bus = None
            await bus.close()
            raise
        log.info("connected to the broker")
