"""Wiring: every adapter the status service uses is built here, and only here."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from pymongo import AsyncMongoClient

from imgpipe.contracts.batching import BatchWriter
from imgpipe.contracts.bus import Bus, BusLink
from imgpipe.contracts.events import AnyEvent
from imgpipe.contracts.mongo import connect, ping, service_database
from imgpipe.contracts.recent import RecentIds
from imgpipe.contracts.service import Resources, keep_trying
from imgpipe.contracts.settings import Settings
from imgpipe.contracts.topology import Topology
from imgpipe.status.adapters.repository import StatusRepository
from imgpipe.status.config import ReadCacheConfig
from imgpipe.status.handlers import Change, handle_event
from imgpipe.status.read_cache import Clock, ReadCache, reader

log = logging.getLogger(__name__)

QUEUE_KEY = "status"
# Handlers are cheap (one batched write each): a deep prefetch lets bursts share a write.
DEFAULT_PREFETCH = 256
FLUSH_AT = 200
KNOWN_REQUESTS = 4096  # requests whose first outcome is remembered (handlers.handle_event)


@dataclass
class Runtime:
    """Everything a running status service holds; `start` and `stop` bracket its life."""

    mongo: AsyncMongoClient
    repository: StatusRepository
    read_cache: ReadCache
    link: BusLink
    resources: Resources

    @classmethod
    async def start(
        cls, settings: Settings, cache_config: ReadCacheConfig, clock: Clock = time.monotonic
    ) -> Runtime:
        resources = Resources()
        try:
            mongo = connect(settings)
            resources.push("closing the database client", mongo.close)
            repository = StatusRepository(service_database(mongo, settings, "status"))
            # Indexes before the first write when the database answers; the first page
            # write creates them otherwise.
            resources.task(keep_trying(repository.ensure_indexes, "creating read-model indexes"))
            read_cache = ReadCache(reader(repository), cache_config, clock)
            writer = _writer(repository, read_cache, settings)
            resources.push("stopping the batch writer", writer.close)
            link = _bus_link(settings, writer)
            await link.start()
            # Pushed last, closed first: no new deliveries; unacked ones are redelivered.
            resources.push("closing the broker connection", link.close)
        except BaseException:
            await resources.close()
            raise
        return cls(mongo, repository, read_cache, link, resources)

    async def readiness(self) -> dict[str, bool]:
        return {"broker": self.link.is_connected, "database": await ping(self.mongo)}

    async def stop(self) -> None:
        await self.resources.close()


def _writer(
    repository: StatusRepository, read_cache: ReadCache, settings: Settings
) -> BatchWriter[Change]:
    async def write(changes: list[Change]) -> None:
        await repository.write(changes)
        urgent = {change.request_id for change in changes if change.urgent}
        read_cache.invalidate({change.request_id for change in changes}, urgent)

    # A rest ends once `flush_at` updates wait; more than the prefetch never can.
    writer: BatchWriter[Change] = BatchWriter(
        write, name="status-batch-writer", flush_at=min(FLUSH_AT, _prefetch(settings))
    )
    writer.start()
    return writer


def _bus_link(settings: Settings, writer: BatchWriter[Change]) -> BusLink:
    started = RecentIds(KNOWN_REQUESTS)

    async def on_event(event: AnyEvent) -> None:
        await handle_event(event, writer.submit, started)

    async def consume(bus: Bus) -> None:
        await bus.consume_events(QUEUE_KEY, on_event)

    async def connect_bus() -> Bus:
        return await Bus.connect(
            settings.amqp_url,
            Topology(settings.namespace, settings.delivery_limit),
            prefetch=_prefetch(settings),
            service="status",
        )

    return BusLink(connect_bus, on_connect=consume)


def _prefetch(settings: Settings) -> int:
    return settings.prefetch or DEFAULT_PREFETCH
