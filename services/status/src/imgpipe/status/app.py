"""The status service: a read model built from events alone, and the API over it."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from pymongo.errors import PyMongoError
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from imgpipe.contracts.bus import Bus
from imgpipe.contracts.events import AnyEvent
from imgpipe.contracts.mongo import connect, ping, service_database
from imgpipe.contracts.recent import RecentIds
from imgpipe.contracts.settings import Settings
from imgpipe.contracts.topology import Topology
from imgpipe.contracts.web import health_router
from imgpipe.status.adapters.batching import BatchWriter
from imgpipe.status.adapters.repository import StatusRepository
from imgpipe.status.config import ReadCacheConfig
from imgpipe.status.handlers import Change, handle_event
from imgpipe.status.read_cache import Clock, ReadCache, reader
from imgpipe.status.routes import status_router

log = logging.getLogger(__name__)

# Handlers are cheap (one batched write each): a deep prefetch lets bursts share a write.
DEFAULT_PREFETCH = 256
FLUSH_AT = 200
KNOWN_REQUESTS = 4096  # requests whose first outcome is remembered (handlers.handle_event)


def create_app(
    settings: Settings | None = None,
    cache_config: ReadCacheConfig | None = None,
    clock: Clock = time.monotonic,
) -> FastAPI:
    """`cache_config` defaults to the environment (`IMGPIPE_STATUS_CACHE_*`); `clock`
    drives the read cache's expiry (tests step it by hand)."""
    settings = settings or Settings()
    cache_config = cache_config or ReadCacheConfig()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        mongo = connect(settings)
        repository = StatusRepository(service_database(mongo, settings, "status"))
        await _index(repository)
        read_cache = ReadCache(reader(repository), cache_config, clock)

        async def write(changes: list[Change]) -> None:
            await repository.write(changes)
            read_cache.invalidate({change.request_id for change in changes})

        prefetch = settings.prefetch or DEFAULT_PREFETCH
        # A rest ends once `flush_at` updates wait; more than the prefetch never can.
        writer: BatchWriter[Change] = BatchWriter(write, flush_at=min(FLUSH_AT, prefetch))
        writer.start()
        app.state.mongo, app.state.repository = mongo, repository
        app.state.read_cache = read_cache

        started = RecentIds(KNOWN_REQUESTS)

        async def on_event(event: AnyEvent) -> None:
            await handle_event(event, writer.submit, started)

        bus: Bus | None = None
        try:
            bus = await Bus.connect(
                settings.amqp_url,
                Topology(settings.namespace, settings.delivery_limit),
                prefetch=prefetch,
                service="status",
            )
            app.state.bus = bus
            await bus.consume_events("status", on_event)
            yield
        finally:
            if bus is not None:
                await bus.close()  # first: no new deliveries; unacked ones are redelivered
            await writer.close()
            await mongo.close()

    async def checks() -> dict[str, bool]:
        bus: Bus | None = getattr(app.state, "bus", None)
        mongo = getattr(app.state, "mongo", None)
        return {
            "broker": bus is not None and bus.is_connected,
            "database": mongo is not None and await ping(mongo),
        }

    app = FastAPI(
        title="imgpipe status",
        summary="Request status, output CSV and local media, from events alone.",
        lifespan=lifespan,
    )
    app.include_router(health_router(checks))
    app.include_router(status_router(settings))
    # Media is public on purpose: its URLs are handed out in status answers and webhooks.
    settings.media_dir.mkdir(parents=True, exist_ok=True)
    app.mount("/media", MediaFiles(directory=settings.media_dir, check_dir=False), name="media")
    return app


class MediaFiles(StaticFiles):
    """The compressed images. A file never changes once written (one name per image of a
    request), so caches may keep it; `nosniff` holds browsers to the served type."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)  # raises for a missing file
        response.headers["Cache-Control"] = "public, max-age=86400"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response


async def _index(repository: StatusRepository) -> None:
    """Indexes before the first write. The service starts without its database, as
    before: the first page write creates them then."""
    try:
        await repository.ensure_indexes()
    except PyMongoError as exc:
        log.warning("read-model indexes not created at start-up (retried on write): %s", exc)
