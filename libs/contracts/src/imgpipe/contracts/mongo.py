"""MongoDB access through PyMongo's async API; each service owns one database."""

from __future__ import annotations

from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from imgpipe.contracts.settings import Settings


def connect(settings: Settings) -> AsyncMongoClient:
    # No retryable writes: every write here is idempotent or checked (a handler that fails
    # on a lost connection is retried by the bus), and SecantusDB keeps each retryable
    # write's reply for 30 minutes, scanning and, past 10,000, sorting them on every write
    # (~5 ms a write once a few thousand images have gone through).
    return AsyncMongoClient(
        settings.mongo_url,
        tz_aware=True,
        serverSelectionTimeoutMS=5_000,
        appname="imgpipe",
        retryWrites=False,
    )


def service_database(client: AsyncMongoClient, settings: Settings, service: str) -> AsyncDatabase:
    return client[settings.database_name(service)]


async def ping(client: AsyncMongoClient) -> bool:
    try:
        await client.admin.command("ping")
    except Exception:
        return False
    return True
