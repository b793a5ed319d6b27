"""Wiring: every adapter the notifier uses is built here, and only here.

The notifier starts whether or not MongoDB and RabbitMQ answer (docs/architecture.md,
"Service shape"): the indexes are created, and the broker connected, in the background
until they answer, and the dispatcher and the sweeper retry each round meanwhile.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from pymongo import AsyncMongoClient
from pymongo.errors import ConnectionFailure

from imgpipe.contracts import mongo
from imgpipe.contracts.bus import Bus, BusLink
from imgpipe.contracts.events import AnyEvent
from imgpipe.contracts.outbound import outbound_client
from imgpipe.contracts.service import Resources, keep_trying
from imgpipe.contracts.settings import Settings
from imgpipe.contracts.topology import Topology
from imgpipe.notifier.adapters.repository import NotifierRepository
from imgpipe.notifier.adapters.webhook_client import Signer, WebhookClient
from imgpipe.notifier.config import NotifierConfig
from imgpipe.notifier.dispatcher import Dispatcher
from imgpipe.notifier.handlers import Deps, handle_event, sweep_overdue_forever

QUEUE_KEY = "notifier"
# ImageProcessed handlers wait in a batch (config.image_batch_window) holding their
# prefetch slot, so the prefetch caps a batch's size: 32 made a backlog drain at most
# 32 events per window. Deep enough for full batches (handlers.MAX_IMAGE_BATCH).
DEFAULT_PREFETCH = 256


@dataclass
class Runtime:
    """Everything a running notifier holds; `start` and `stop` bracket its life."""

    settings: Settings
    mongo: AsyncMongoClient
    repo: NotifierRepository
    dispatcher: Dispatcher
    link: BusLink
    resources: Resources

    @classmethod
    async def start(cls, settings: Settings, config: NotifierConfig) -> Runtime:
        signer = Signer(settings.resolved_webhook_secret)  # a bad secret fails the start
        resources = Resources()
        try:
            client = mongo.connect(settings)
            resources.push("closing the database client", client.close)
            repo = NotifierRepository(mongo.service_database(client, settings, "notifier"))
            indexes = resources.task(keep_trying(repo.ensure_indexes, "creating indexes"))
            http = outbound_client(settings, timeout=config.timeout)
            webhooks = WebhookClient(http, signer, config.timeout)
            resources.push("closing the HTTP client", webhooks.aclose)
            dispatcher = Dispatcher(repo.deliveries, settings, config, webhooks)
            dispatcher.start()
            resources.push("stopping the dispatcher", dispatcher.stop)
            deps = Deps(repo, settings, config, wake=dispatcher.wake)
            resources.task(
                asyncio.create_task(sweep_overdue_forever(deps), name="final-webhook-sweeper")
            )

            async def on_event(event: AnyEvent) -> None:
                if not indexes.done():
                    # Deliveries are unique per (request, endpoint, type) by an index; until
                    # it exists the database counts as unavailable (the bus retries in place).
                    raise ConnectionFailure("the notifier's indexes are not created yet")
                await handle_event(event, deps)

            async def consume(bus: Bus) -> None:
                await bus.consume_events(QUEUE_KEY, on_event)

            link = BusLink(
                lambda: Bus.connect(
                    settings.amqp_url,
                    Topology(settings.namespace, settings.delivery_limit),
                    prefetch=settings.prefetch or DEFAULT_PREFETCH,
                    service="notifier",
                ),
                on_connect=consume,
            )
            # Closed first on stop: no new events; unacked ones are redelivered.
            resources.push("closing the broker connection", link.close)
            await link.start()
        except BaseException:
            await resources.close()
            raise
        return cls(settings, client, repo, dispatcher, link, resources)

    async def readiness(self) -> dict[str, bool]:
        return {"broker": self.link.is_connected, "database": await mongo.ping(self.mongo)}

    async def stop(self) -> None:
        await self.resources.close()
