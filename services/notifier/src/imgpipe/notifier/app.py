"""The notifier's FastAPI app: consumes events, plans webhooks, runs the dispatcher."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from imgpipe.contracts import mongo
from imgpipe.contracts.bus import Bus
from imgpipe.contracts.events import AnyEvent
from imgpipe.contracts.outbound import outbound_client
from imgpipe.contracts.settings import Settings
from imgpipe.contracts.topology import Topology
from imgpipe.contracts.web import health_router, require_api_key
from imgpipe.notifier.adapters.repository import Repository
from imgpipe.notifier.adapters.signing import Signer
from imgpipe.notifier.config import NotifierConfig
from imgpipe.notifier.dispatcher import Dispatcher
from imgpipe.notifier.handlers import Deps, handle_event, plan_overdue
from imgpipe.notifier.routes import router

log = logging.getLogger(__name__)
QUEUE_KEY = "notifier"
# ImageProcessed handlers wait in a batch (config.image_batch_window) holding their
# prefetch slot, so the prefetch caps a batch's size: 32 made a backlog drain at most
# 32 events per window. Deep enough for full batches (Batcher's max_batch is 200).
DEFAULT_PREFETCH = 256
SHUTDOWN_STEP_SECONDS = 10.0


def create_app(settings: Settings | None = None, config: NotifierConfig | None = None) -> FastAPI:
    settings = settings or Settings()
    config = config or NotifierConfig()
    signer = Signer(settings.resolved_webhook_secret)  # fail at start on a bad secret

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = mongo.connect(settings)
        repo = Repository(mongo.service_database(client, settings, "notifier"))
        await repo.ensure_indexes()
        http = outbound_client(settings, timeout=config.timeout)
        dispatcher = Dispatcher(repo, settings, config, http, signer)
        deps = Deps(repo, settings, config, wake=dispatcher.wake)
        app.state.deps, app.state.dispatcher, app.state.mongo = deps, dispatcher, client
        bus = await Bus.connect(
            settings.amqp_url,
            Topology(settings.namespace, settings.delivery_limit),
            prefetch=settings.prefetch or DEFAULT_PREFETCH,
            service="notifier",
        )
        app.state.bus = bus
        dispatcher.start()
        sweeper = asyncio.create_task(_sweep_forever(deps), name="final-webhook-sweeper")

        async def on_event(event: AnyEvent) -> None:
            await handle_event(event, deps)

        await bus.consume_events(QUEUE_KEY, on_event)
        try:
            yield
        finally:
            # Stop taking events first; unacked ones are redelivered.
            await _bounded("closing the broker connection", bus.close())
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
            await _bounded("stopping the dispatcher", dispatcher.stop())
            await _bounded("closing the HTTP client", http.aclose())
            await _bounded("closing the database client", client.close())

    app = FastAPI(
        title="imgpipe notifier",
        description="Signed, retried webhooks (Standard Webhooks) for request status changes.",
        lifespan=lifespan,
    )

    async def checks() -> dict[str, bool]:
        bus: Bus | None = getattr(app.state, "bus", None)
        client = getattr(app.state, "mongo", None)
        return {
            "broker": bool(bus and bus.is_connected),
            "database": bool(client and await mongo.ping(client)),
        }

    app.include_router(health_router(checks))
    app.include_router(router, dependencies=[Depends(require_api_key(settings))])
    return app


async def _bounded(step: str, awaitable: Awaitable[None]) -> None:
    """Shutdown must end: a step still running after SHUTDOWN_STEP_SECONDS is logged and
    left behind (its state is in MongoDB and the broker, so nothing is lost)."""
    task = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait({task}, timeout=SHUTDOWN_STEP_SECONDS)
    if not done:
        log.warning("shutdown: %s took over %.0fs; leaving it", step, SHUTDOWN_STEP_SECONDS)
    elif task.exception() is not None:
        log.warning("shutdown: %s failed: %r", step, task.exception())


async def _sweep_forever(deps: Deps) -> None:
    """Final webhooks held back for missing image outcomes go out after the grace time."""
    interval = max(deps.config.poll_interval, min(deps.config.completion_grace / 4, 5.0))
    while True:
        await asyncio.sleep(interval)
        try:
            await plan_overdue(deps)
        except Exception:
            log.exception("sweep of held-back final webhooks failed")
