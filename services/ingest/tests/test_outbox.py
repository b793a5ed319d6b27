"""The outbox: an upload the broker did not confirm still goes out, via the relay."""

from __future__ import annotations

import asyncio
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase

from imgpipe.contracts.settings import Settings

CSV = "S. No.,Product Name,Input Image Urls\n1,Shirt,https://img.example.com/a.jpg\n"


def upload_form() -> dict[str, Any]:
    return {"files": {"file": ("products.csv", CSV.encode(), "text/csv")}}


async def eventually(condition, what: str) -> None:
    """Poll until `condition()` holds; the relay works in the background."""
    try:
        async with asyncio.timeout(60):
            while not await condition():  # noqa: ASYNC110 - the state lives in another system
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"gave up waiting until {what}") from None


async def published(db: AsyncDatabase, request_id: str) -> bool:
    doc = await db.requests.find_one({"_id": request_id})
    return doc is not None and doc["published_at"] is not None


async def test_broker_down_at_startup_then_back(
    settings: Settings, run_ingest, received_events, ingest_db, broker_proxy, via_proxy
) -> None:
    broker_proxy.down()
    async with run_ingest(via_proxy(settings, broker_proxy)) as (_, client):
        assert (await client.get("/readyz")).status_code == 503
        response = await client.post("/upload", **upload_form())
        assert response.status_code == 202, response.text
        request_id = response.json()["request_id"]
        stored = await ingest_db.requests.find_one({"_id": request_id})
        assert stored is not None and stored["published_at"] is None

        broker_proxy.up()
        event = await received_events.next()
        assert event.id == f"{request_id}:received"
        assert [row.serial_number for row in event.data.rows] == ["1"]
        await eventually(lambda: published(ingest_db, request_id), "marked published")


async def test_broker_lost_after_startup_then_back(
    settings: Settings, run_ingest, received_events, ingest_db, broker_proxy, via_proxy
) -> None:
    async with run_ingest(via_proxy(settings, broker_proxy)) as (_, client):
        assert (await client.get("/readyz")).status_code == 200
        broker_proxy.down()

        async def not_ready() -> bool:
            return (await client.get("/readyz")).status_code == 503

        await eventually(not_ready, "ingest notices the broker is gone")
        response = await client.post("/upload", **upload_form())
        assert response.status_code == 202, response.text
        request_id = response.json()["request_id"]
        assert not await published(ingest_db, request_id)

        broker_proxy.up()
        event = await received_events.next()
        assert event.id == f"{request_id}:received"
        await eventually(lambda: published(ingest_db, request_id), "marked published")
