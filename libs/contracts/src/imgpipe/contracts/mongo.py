"""MongoDB access through PyMongo's async API; each service owns one database."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from pymongo import AsyncMongoClient, WriteConcern
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError

from imgpipe.contracts.settings import Settings

LOCAL_MONGODB_URL = "mongodb://127.0.0.1:27017"
DUPLICATE_KEY = 11000  # MongoDB's error code for a unique index (or _id) already taken
Document = dict[str, Any]
Client = AsyncMongoClient[Document]
Database = AsyncDatabase[Document]
Collection = AsyncCollection[Document]


def connect(settings: Settings) -> Client:
    return AsyncMongoClient(
        settings.mongodb_url or LOCAL_MONGODB_URL,
        tz_aware=True,
        serverSelectionTimeoutMS=5_000,
        appname="imgpipe",
        # Every service acks a broker message once its write is confirmed: confirmed must
        # mean on disk. Without it a database killed just after loses what it confirmed
        # (MongoDB: up to ~100 ms of writes; SecantusDB: the last few dozen documents),
        # and the acked message that carried it is gone for good.
        journal=True,
    )


def followed_by_journaled(collection: Collection) -> Collection:
    """`collection` with writes that return before their journal is on disk.

    Only for writes that the same service always follows, before anything leaves it (a
    broker ack, a publish, an HTTP answer), with a journaled write to the same server:
    the journal is written in order, so once that write is on disk every write before it
    is too (MongoDB's journal and SecantusDB's WiredTiger log alike). A crash before it
    loses them, and the work that made them is redone, since nothing was acked. It spares
    a sync per write: SecantusDB commits each updated document, and syncs each commit, on
    its own (docs/architecture.md, "Durability"). One journal means one server or replica
    set: it does not hold across the shards of a sharded collection."""
    return collection.with_options(write_concern=WriteConcern(w=1, j=False))


def service_database(client: Client, settings: Settings, service: str) -> Database:
    return client[settings.database_name(service)]


async def ping(client: Client) -> bool:
    try:
        await client.admin.command("ping")
    except Exception:
        return False
    return True


class Once:
    """A step that must succeed once before the writes that depend on it: index
    creation, since SecantusDB can wedge when a write races `createIndexes` on a
    collection that does not exist yet. Concurrent callers wait for the same attempt; a
    failed attempt (the database down) is tried again by the next caller."""

    def __init__(self, step: Callable[[], Awaitable[object]]) -> None:
        self._step = step
        self._done = False
        self._lock = asyncio.Lock()

    async def __call__(self) -> None:
        if self._done:
            return
        async with self._lock:
            if not self._done:
                await self._step()
                self._done = True


async def insert_new(collection: Collection, docs: Sequence[Mapping[str, Any]]) -> list[bool]:
    """Insert each document whose `_id` is not taken, in one unordered round trip; for
    each, True if this call inserted it. Inserts of a batch are one commit in SecantusDB,
    where each updated document is one of its own: a write that is usually new is
    cheaper as an insert, with an update for the few that exist."""
    if not docs:
        return []
    try:
        await collection.insert_many([dict(doc) for doc in docs], ordered=False)
    except BulkWriteError as exc:
        taken = duplicate_indexes(exc)
        if taken is None:
            raise
        return [index not in taken for index in range(len(docs))]
    return [True] * len(docs)


def duplicate_indexes(exc: BulkWriteError) -> set[int] | None:
    """Which documents of an unordered bulk insert existed already (their `_id` was
    taken: another delivery stored them first); None when any error is of another kind."""
    details = exc.details or {}
    errors: list[dict[str, Any]] = details.get("writeErrors") or []
    if details.get("writeConcernErrors"):  # written, but not as durably as asked
        return None
    if not errors or any(error.get("code") != DUPLICATE_KEY for error in errors):
        return None
    return {int(error["index"]) for error in errors}
