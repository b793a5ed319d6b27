"""Every service starts while its database and broker are down, says so on /readyz, and
connects by itself once they answer (docs/architecture.md, "Service shape")."""

from __future__ import annotations

import asyncio
import importlib
import time
from pathlib import Path

import httpx
import pytest
from asgi_lifespan import LifespanManager

from imgpipe.contracts.settings import Settings
from tests.support.faults import (
    RestartableMongo,
    limit_connections,
    own_vhost,
    require_rabbitmqctl,
)

SERVICES = ("ingest", "processor", "status", "notifier")


async def readiness(client: httpx.AsyncClient) -> tuple[int, dict]:
    response = await client.get("/readyz")
    body = response.json()
    return response.status_code, body.get("detail") or body.get("checks") or {}


async def ready_within(client: httpx.AsyncClient, seconds: float) -> tuple[int, dict]:
    deadline = time.monotonic() + seconds
    while True:
        status, checks = await readiness(client)
        if status == 200 or time.monotonic() > deadline:
            return status, checks
        await asyncio.sleep(0.5)


@pytest.mark.parametrize("service", SERVICES)
async def test_a_service_starts_without_its_database_and_broker(
    service: str, settings: Settings, tmp_path: Path
) -> None:
    require_rabbitmqctl(settings.amqp_url)
    create_app = importlib.import_module(f"imgpipe.{service}.app").create_app
    vhost = f"imgpipe-{settings.namespace}-{service}"
    database = RestartableMongo(tmp_path / "db", tmp_path / "db.log")  # not started yet
    with own_vhost(settings.amqp_url, vhost) as amqp_url:
        limit_connections(vhost, 0)  # the broker refuses this service's connections
        settings = settings.model_copy(
            update={"amqp_url": amqp_url, "mongodb_url": database.url, "workers": 1}
        )
        app = create_app(settings)
        try:
            async with LifespanManager(app, startup_timeout=60, shutdown_timeout=60):
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
                    assert (await client.get("/healthz")).status_code == 200
                    status, checks = await readiness(client)
                    assert status == 503
                    assert checks == {"broker": False, "database": False}

                    database.start()
                    limit_connections(vhost, -1)
                    status, checks = await ready_within(client, 60)
                    assert status == 200, checks
                    assert checks == {"broker": True, "database": True}
        finally:
            database.stop()
