"""Fixtures for the processor's tests: an image server, and a tap on the events exchange."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import aio_pika
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from imgpipe.contracts.bus import Bus
from imgpipe.contracts.events import (
    AnyEvent,
    CloudEvent,
    Counts,
    ImageProcessed,
    RequestCompleted,
    RequestReceived,
    Row,
    parse_event,
    received_event_id,
)
from imgpipe.contracts.mongo import connect, service_database
from imgpipe.contracts.settings import Settings
from imgpipe.contracts.topology import Topology
from imgpipe.processor.adapters.repository import ProcessorRepository
from imgpipe.processor.app import create_app
from imgpipe.processor.bootstrap import build_downloader, build_storage
from imgpipe.processor.compress import Compressed, compress
from imgpipe.processor.handlers import Processor
from tests.support.http_server import LoopbackServer, loopback_server

SENTINEL = "tap-sentinel"


@pytest.fixture
def image_server() -> Iterator[LoopbackServer]:
    with loopback_server() as server:
        yield server


@pytest.fixture
def processor_settings(settings: Settings) -> Settings:
    """One image worker per app: the machines have two cores and other tests run too."""
    return settings.model_copy(update={"workers": 1})


def request_received(request_id: str, urls_per_row: list[list[str]]) -> CloudEvent:
    rows = [
        Row(serial_number=str(i + 1), product_name=f"Product {i + 1}", input_urls=urls)
        for i, urls in enumerate(urls_per_row)
    ]
    data = RequestReceived(
        request_id=request_id,
        rows=rows,
        image_count=sum(len(urls) for urls in urls_per_row),
        received_at=datetime.now(UTC),
    )
    return CloudEvent.wrap(data, source="test", id=received_event_id(request_id))


class EventTap:
    """A queue of our own on the events exchange: hears what the processor publishes.

    `flush` publishes a sentinel and reads up to it; the queue is FIFO, so everything
    published (and confirmed) before the call has then been heard."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.events: list[AnyEvent] = []
        self._inbox: asyncio.Queue[AnyEvent] = asyncio.Queue()

    async def start(self) -> None:
        queue = await self.bus.channel.declare_queue(exclusive=True, auto_delete=True)
        for key in (ImageProcessed.routing_key, RequestCompleted.routing_key):
            await queue.bind(self.bus.events, key)

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            await self._inbox.put(parse_event(message.body))

        await queue.consume(on_message, no_ack=True)

    async def next(self) -> AnyEvent:
        event = await asyncio.wait_for(self._inbox.get(), 120)
        self.events.append(event)
        return event

    async def until(self, request_id: str, event_type: type, count: int = 1) -> AnyEvent:
        """Read until the `count`-th event of this type for this request arrives."""
        while True:
            event = await self.next()
            if isinstance(event.data, event_type) and event.data.request_id == request_id:
                seen = [
                    e
                    for e in self.events
                    if isinstance(e.data, event_type) and e.data.request_id == request_id
                ]
                if len(seen) >= count:
                    return event

    async def flush(self) -> list[AnyEvent]:
        data = RequestCompleted(
            request_id=SENTINEL,
            status="error",
            counts=Counts(total=0, ok=0, failed=0),
            completed_at=datetime.now(UTC),
        )
        await self.bus.publish(CloudEvent.wrap(data, source="test", id=SENTINEL))
        await self.until(SENTINEL, RequestCompleted)
        return [e for e in self.events if e.data.request_id != SENTINEL]

    def of(self, request_id: str, event_type: type) -> list[AnyEvent]:
        return [
            e
            for e in self.events
            if isinstance(e.data, event_type) and e.data.request_id == request_id
        ]


@pytest.fixture
async def tap(settings: Settings) -> AsyncIterator[EventTap]:
    """Also a Bus for the test to publish with; declares the topology before any app runs."""
    bus = await Bus.connect(
        settings.amqp_url, Topology(settings.namespace, settings.delivery_limit)
    )
    tap = EventTap(bus)
    await tap.start()
    try:
        yield tap
    finally:
        await bus.close()


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[FastAPI]:
    app = create_app(settings)
    async with LifespanManager(app, startup_timeout=60, shutdown_timeout=60):
        yield app


@pytest.fixture
def run_processor():
    """`async with run_processor(settings) as app:` runs one processor (lifespan and all)."""
    return running


@pytest.fixture
def make_request():
    return request_received


@pytest.fixture
async def processor(settings: Settings, tap: EventTap) -> AsyncIterator[Processor]:
    """The handlers with real adapters but no consumers: tests call them directly.
    Compression runs inline (the same pure function the pool runs)."""

    async def inline(data: bytes, quality: int) -> Compressed:
        return compress(data, quality, settings.max_image_pixels)

    mongo = connect(settings)
    repository = ProcessorRepository(service_database(mongo, settings, "processor"))
    await repository.ensure_indexes()
    downloader = build_downloader(settings)
    try:
        yield Processor(
            repository=repository,
            bus=tap.bus,
            storage=build_storage(settings),
            download=downloader,
            compressor=inline,
            topology=tap.bus.topology,
            instance="test",
        )
    finally:
        await downloader.aclose()
    await mongo.close()
