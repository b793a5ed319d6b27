"""Fixtures for the processor's tests: an image server, and a tap on the events exchange."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from imgpipe.contracts.events import (
    CloudEvent,
    ImageProcessed,
    Options,
)
from imgpipe.contracts.mongo import connect, service_database
from imgpipe.contracts.settings import Settings
from imgpipe.processor.adapters.repository import ProcessorRepository
from imgpipe.processor.app import create_app
from imgpipe.processor.bootstrap import build_downloader, build_storage
from imgpipe.processor.compress import Compressed, compress
from imgpipe.processor.handlers import Processor
from tests.support import events
from tests.support.http_server import LoopbackServer, loopback_server
from tests.support.tap import EventTap, event_tap


@pytest.fixture
def image_server() -> Iterator[LoopbackServer]:
    with loopback_server() as server:
        yield server


@pytest.fixture
def processor_settings(settings: Settings) -> Settings:
    """One image worker per app: the machines have two cores and other tests run too."""
    return settings.model_copy(update={"workers": 1})


def request_received(request_id: str, urls_per_row: list[list[str]]) -> CloudEvent:
    return events.received(request_id, events.rows_of(urls_per_row), at=datetime.now(UTC))


@pytest.fixture
async def tap(settings: Settings) -> AsyncIterator[EventTap]:
    """Hears what the processor publishes; also a Bus to publish with. Opened before any
    app runs (it declares the topology)."""
    async with event_tap(settings, (ImageProcessed.routing_key,)) as tap:
        yield tap


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

    async def inline(data: bytes, options: Options) -> Compressed:
        return compress(data, options, settings.max_image_pixels)

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
