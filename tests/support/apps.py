"""The one harness for a service's app in tests: its lifespan run for real (database,
broker, background tasks), and an HTTP client that talks to it in-process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from imgpipe.contracts.bus import Bus
from imgpipe.contracts.settings import Settings
from imgpipe.contracts.topology import Topology

STARTUP_SECONDS = 60.0


@asynccontextmanager
async def serving(
    app: FastAPI, base_url: str = "http://service", lifespan_seconds: float = STARTUP_SECONDS
) -> AsyncIterator[httpx.AsyncClient]:
    """Start `app` (as uvicorn would), yield a client for it, stop it on the way out."""
    async with LifespanManager(
        app, startup_timeout=lifespan_seconds, shutdown_timeout=lifespan_seconds
    ) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url=base_url) as client:
            yield client


@asynccontextmanager
async def serving_with_bus(
    app: FastAPI, settings: Settings, base_url: str = "http://service"
) -> AsyncIterator[tuple[httpx.AsyncClient, Bus]]:
    """`serving`, and a Bus on the same broker and namespace to publish events with."""
    async with serving(app, base_url) as client:
        bus = await Bus.connect(settings.amqp_url, Topology(settings.namespace))
        try:
            yield client, bus
        finally:
            await bus.close()
