"""The ingest Runtime: the one place its adapters are built, wired, started and stopped.

It starts whether or not the database and broker answer: the Mongo client connects on
first use, the bus connects in the background, and uploads taken while the broker is
down wait in the outbox for the relay.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import timedelta

from pymongo import AsyncMongoClient

from imgpipe.contracts.bus import Bus, BusLink
from imgpipe.contracts.events import AnyEvent
from imgpipe.contracts.mongo import connect, ping, service_database
from imgpipe.contracts.service import Resources, keep_trying
from imgpipe.contracts.settings import Settings
from imgpipe.contracts.topology import Topology
from imgpipe.ingest import commands, handlers
from imgpipe.ingest.adapters.idempotency import IdempotencyKeys
from imgpipe.ingest.adapters.publisher import EventPublisher
from imgpipe.ingest.adapters.repository import IngestRepository
from imgpipe.ingest.config import OutboxConfig, RetentionConfig

log = logging.getLogger(__name__)

QUEUE_KEY = "ingest"  # the end and restart of runs, to answer cancel and retry
DEFAULT_PREFETCH = 16


@dataclass
class Runtime:
    mongo: AsyncMongoClient
    repository: IngestRepository
    publisher: EventPublisher
    resources: Resources
    keys: IdempotencyKeys

    @classmethod
    async def start(
        cls, settings: Settings, config: OutboxConfig, retention: RetentionConfig | None = None
    ) -> Runtime:
        resources = Resources()
        try:
            mongo = connect(settings)
            resources.push("closing the database client", mongo.close)
            database = service_database(mongo, settings, "ingest")
            repository = IngestRepository(database)
            keys = IdempotencyKeys(database)
            topology = Topology(settings.namespace, settings.delivery_limit)

            async def follow_runs(bus: Bus) -> None:  # once the broker answers
                async def on_event(event: AnyEvent) -> None:
                    await commands.follow_run(event, repository)

                await bus.consume_events(QUEUE_KEY, on_event)

            link = BusLink(
                lambda: Bus.connect(
                    settings.amqp_url,
                    topology,
                    prefetch=settings.prefetch or DEFAULT_PREFETCH,
                    service="ingest",
                ),
                retry_interval=config.connect_retry,
                on_connect=follow_runs,
            )
            resources.push("closing the broker connection", link.close)
            await link.start()
            if not link.is_connected:
                log.warning("broker unavailable: uploads are kept in the outbox until it answers")
            publisher = EventPublisher(link, publish_timeout=config.publish_timeout)
            # Uploads create the indexes too before they write; this gets it done early.
            resources.task(keep_trying(repository.ensure_indexes, "creating ingest indexes"))
            resources.task(keep_trying(keys.ensure_indexes, "creating idempotency key indexes"))
            relay = handlers.run_relay(
                repository,
                publisher,
                interval=config.interval,
                lease=timedelta(seconds=config.lease),
                batch=config.batch,
            )
            resources.task(asyncio.create_task(relay, name="ingest-outbox-relay"))
            if retention is not None and retention.days is not None:
                sweep = commands.run_retention(
                    repository, publisher, keys, days=retention.days, interval=retention.interval
                )
                resources.task(asyncio.create_task(sweep, name="ingest-retention"))
        except BaseException:
            await resources.close()
            raise
        return cls(mongo, repository, publisher, resources, keys)

    async def readiness(self) -> dict[str, bool]:
        return {"broker": self.publisher.is_connected, "database": await ping(self.mongo)}

    async def stop(self) -> None:
        await self.resources.close()
