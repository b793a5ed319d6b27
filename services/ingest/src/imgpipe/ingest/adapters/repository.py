"""Submitted requests in the ingest database, with their outbox state.

A request document holds its rows inline while they are small. Rows that could
push a document towards MongoDB's 16 MB limit go to `request_rows` in chunks,
written before the request document: the request document is the commit point,
so the outbox relay never sees a request whose rows are incomplete.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar

from pymongo import ASCENDING, ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError

from imgpipe.contracts.events import Options, Row
from imgpipe.contracts.mongo import Once
from imgpipe.ingest.domain import IngestRequest, Run, StoreUnavailable

log = logging.getLogger(__name__)

REQUESTS = "requests"
REQUEST_ROWS = "request_rows"
DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024

T = TypeVar("T")


class IngestRepository:
    def __init__(self, db: AsyncDatabase, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        self.requests = db[REQUESTS]
        self.rows = db[REQUEST_ROWS]
        self.chunk_bytes = chunk_bytes
        # Once, before this process writes: the Runtime tries it in the background from
        # start (the database may be down), and every write awaits it first.
        self.ensure_indexes = Once(lambda: _guarded(self._create_indexes))

    async def _create_indexes(self) -> None:
        await self.requests.create_index([("published_at", ASCENDING), ("relay_after", ASCENDING)])
        await self.rows.create_index([("request_id", ASCENDING), ("index", ASCENDING)])
        # The retention sweep's filter, field for field.
        await self.requests.create_index("run.finished_at")

    async def add(self, request: IngestRequest, *, relay_after: datetime) -> None:
        """Store a request as not yet published; the relay may send it after `relay_after`."""
        await self.ensure_indexes()
        chunks = _chunk_rows(request.rows, self.chunk_bytes)
        doc: dict[str, Any] = {
            "_id": request.request_id,
            "options": request.options.model_dump(),
            "webhook_url": request.webhook_url,
            "image_count": request.image_count,
            "row_count": len(request.rows),
            "received_at": request.received_at,
            "published_at": None,
            "relay_after": relay_after,
            "traceparent": request.traceparent,
            "refresh": request.refresh,
            "run": Run().to_doc(),
        }
        if len(chunks) <= 1:
            doc["rows"], doc["row_chunks"] = (chunks[0] if chunks else []), 0
            await _guarded(lambda: self.requests.insert_one(doc))
            return
        doc["rows"], doc["row_chunks"] = [], len(chunks)
        try:
            await _guarded(lambda: self.rows.insert_many(_chunk_docs(request.request_id, chunks)))
            await _guarded(lambda: self.requests.insert_one(doc))
        except StoreUnavailable:
            await self._drop_rows(request.request_id)
            raise

    async def mark_published(self, request_id: str, at: datetime) -> None:
        await _guarded(
            lambda: self.requests.update_one({"_id": request_id}, {"$set": {"published_at": at}})
        )

    async def claim_unpublished(self, now: datetime, lease: timedelta) -> IngestRequest | None:
        """Take the oldest due unpublished request for `lease`, so relays do not double up."""
        await self.ensure_indexes()
        doc = await _guarded(
            lambda: self.requests.find_one_and_update(
                {"published_at": None, "relay_after": {"$lte": now}},
                {"$set": {"relay_after": now + lease}},
                sort=[("relay_after", ASCENDING)],
                return_document=ReturnDocument.AFTER,
            )
        )
        return None if doc is None else await self._load(doc)

    # Runs: what ingest knows of a request's state, from the processor's events ---------

    async def get_run(self, request_id: str) -> Run | None:
        """The request's run, or None when there is no such request."""
        doc = await _guarded(
            lambda: self.requests.find_one({"_id": request_id}, {"run": 1, "traceparent": 1})
        )
        if doc is None:
            return None
        return Run.from_doc(doc.get("run"), doc.get("traceparent"))

    async def follow(self, request_id: str, run: Run) -> None:
        """Take `run` if it is later than the one stored (events may come out of order)."""
        known = await self.get_run(request_id)
        if known is not None and known.version < run.version:
            await _guarded(
                lambda: self.requests.update_one(
                    {"_id": request_id}, {"$set": {"run": run.to_doc()}}
                )
            )

    async def replace_run(self, request_id: str, expected: Run, new: Run) -> bool:
        """Compare and set: False when the run changed since `expected` was read (a
        concurrent command or event), so two clicks cannot start two retries."""
        result = await _guarded(
            lambda: self.requests.update_one(
                {"_id": request_id, "run.version": expected.version},
                {"$set": {"run": new.to_doc()}},
            )
        )
        return result.modified_count == 1

    async def finished_before(self, before: datetime, limit: int) -> list[str]:
        """Ids of requests whose run ended before `before` (the retention sweep's)."""
        cursor = self.requests.find({"run.finished_at": {"$lt": before}}, {"_id": 1}).limit(limit)
        docs = await _guarded(lambda: cursor.to_list(None))
        return [doc["_id"] for doc in docs]

    async def delete(self, request_id: str) -> None:
        """Drop the request and its row chunks."""
        await _guarded(lambda: self.requests.delete_one({"_id": request_id}))
        await _guarded(lambda: self.rows.delete_many({"request_id": request_id}))

    async def _load(self, doc: dict[str, Any]) -> IngestRequest:
        rows = doc["rows"]
        if doc["row_chunks"]:
            cursor = self.rows.find({"request_id": doc["_id"]}).sort("index", ASCENDING)
            chunks = await _guarded(lambda: cursor.to_list(None))
            rows = [row for chunk in chunks for row in chunk["rows"]]
        return IngestRequest(
            request_id=doc["_id"],
            rows=[Row.model_validate(row) for row in rows],
            options=Options.model_validate(doc["options"]),
            webhook_url=doc["webhook_url"],
            received_at=doc["received_at"],
            traceparent=doc.get("traceparent"),  # absent from requests stored before traces
            refresh=doc.get("refresh", False),
        )

    async def _drop_rows(self, request_id: str) -> None:
        try:
            await self.rows.delete_many({"request_id": request_id})
        except PyMongoError as exc:  # orphan chunks are harmless: no request points at them
            log.warning("could not remove row chunks of %s: %s", request_id, exc)


async def _guarded(operation: Callable[[], Awaitable[T]]) -> T:
    """Run one database operation; any driver failure means the store is unavailable."""
    try:
        return await operation()
    except PyMongoError as exc:
        raise StoreUnavailable(str(exc)) from exc


def _chunk_rows(rows: list[Row], chunk_bytes: int) -> list[list[dict[str, Any]]]:
    """Rows as documents, grouped so that each group stays near `chunk_bytes` of BSON."""
    chunks: list[list[dict[str, Any]]] = []
    current: list[dict[str, Any]] = []
    size = 0
    for row in rows:
        row_size = _row_size(row)
        if current and size + row_size > chunk_bytes:
            chunks.append(current)
            current, size = [], 0
        current.append(row.model_dump())
        size += row_size
    if current:
        chunks.append(current)
    return chunks


def _row_size(row: Row) -> int:
    """An upper estimate of a row's BSON size (keys, type bytes and array indexes)."""
    strings = [row.serial_number, row.product_name, *row.input_urls]
    return 96 + sum(len(text.encode()) + 16 for text in strings)


def _chunk_docs(request_id: str, chunks: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return [
        {"_id": f"{request_id}:{index:06d}", "request_id": request_id, "index": index, "rows": rows}
        for index, rows in enumerate(chunks)
    ]
