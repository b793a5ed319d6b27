"""What the notifier learned about each request from events, in three collections.

- `requests`: one document per request, and which webhook types it has already
  planned (so a duplicate event never plans again).
- `rows`: the request's CSV rows from RequestReceived, in chunks (a 100k-row request
  would not fit one document).
- `images`: one document per image (inserted once, from its first ImageProcessed), to
  count outcomes and build the final product list.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal, NotRequired, TypedDict

from pymongo import ASCENDING, ReturnDocument, UpdateOne
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError

from imgpipe.contracts.events import ImageProcessed, RequestCompleted, RequestReceived
from imgpipe.contracts.mongo import duplicate_indexes
from imgpipe.notifier.webhooks import FINAL_TYPES

ROWS_PER_CHUNK = 1000


class Completion(TypedDict):
    status: Literal["completed", "error"]
    counts: dict[str, int]  # total, ok, failed
    completed_at: datetime


class RequestDoc(TypedDict):
    """A request as the notifier knows it; each field arrives with its own event."""

    _id: str
    planned: list[str]  # webhook types planned so far
    received: bool  # RequestReceived seen: the rows and the webhook URL are here
    webhook_url: NotRequired[str | None]
    image_count: NotRequired[int]
    received_at: NotRequired[datetime]
    first_processed_at: NotRequired[datetime]  # the earliest ImageProcessed's time
    completed: NotRequired[Completion]
    final_pending: NotRequired[bool]  # completed, final webhook not planned yet
    completed_seen_at: NotRequired[datetime]
    traceparent: NotRequired[str | None]  # the request's trace, from RequestReceived


class Row(TypedDict):
    serial_number: str
    product_name: str
    input_urls: list[str]


class ImageDoc(TypedDict):
    _id: str  # "<request id>:<image key>"
    request_id: str
    key: str
    outcome: Literal["ok", "failed"]
    output_url: str | None
    error: dict[str, str] | None  # code, message
    attempts: int | None
    # Sizes of an ok image; absent from images stored before the notifier kept them.
    bytes_in: NotRequired[int | None]
    bytes_out: NotRequired[int | None]


class ImageBytes(TypedDict):
    """What the byte totals need of an ok image (image_bytes' projection)."""

    output_url: str | None
    bytes_in: NotRequired[int | None]
    bytes_out: NotRequired[int | None]


class Requests:
    def __init__(self, db: AsyncDatabase) -> None:
        self.requests = db["requests"]
        self.rows = db["rows"]
        self.images = db["images"]

    async def ensure_indexes(self) -> None:
        await self.images.create_index("request_id")
        # image_counts' filter, field for field (SecantusDB uses an index only then).
        await self.images.create_index([("request_id", ASCENDING), ("outcome", ASCENDING)])
        await self.rows.create_index([("request_id", ASCENDING), ("chunk", ASCENDING)])
        await self.requests.create_index([("final_pending", ASCENDING), ("completed_seen_at", 1)])

    async def mark_received(
        self, data: RequestReceived, traceparent: str | None = None
    ) -> RequestDoc:
        """Store the rows first, then the flag: whoever sees `received` finds the rows.
        `traceparent` (the event's) is kept for the request's webhooks."""
        chunks = [
            data.rows[start : start + ROWS_PER_CHUNK]
            for start in range(0, len(data.rows), ROWS_PER_CHUNK)
        ]
        if chunks:
            await self.rows.bulk_write(
                [
                    UpdateOne(
                        {"_id": f"{data.request_id}:{index:06d}"},
                        {
                            "$set": {
                                "request_id": data.request_id,
                                "chunk": index,
                                "rows": [row.model_dump() for row in chunk],
                            }
                        },
                        upsert=True,
                    )
                    for index, chunk in enumerate(chunks)
                ],
                ordered=False,
            )
        return await self._upsert(
            data.request_id,
            {
                "$set": {
                    "received": True,
                    "webhook_url": data.webhook_url,
                    "image_count": data.image_count,
                    "received_at": data.received_at,
                    "traceparent": traceparent,
                }
            },
        )

    async def store_images(self, batch: list[ImageProcessed]) -> None:
        """Insert the images of a batch of ImageProcessed in one round trip.

        An image's outcome never changes (a redelivered ImageProcessed carries the stored
        one), so one already here is skipped: inserts cost SecantusDB a fifth of upserts."""
        docs: list[ImageDoc] = [
            {
                "_id": f"{data.request_id}:{data.image_key}",
                "request_id": data.request_id,
                "key": data.image_key,
                "outcome": data.outcome,
                "output_url": data.output_url,
                "error": data.error.model_dump() if data.error else None,
                "attempts": data.attempts,
                "bytes_in": data.bytes_in,
                "bytes_out": data.bytes_out,
            }
            for data in batch
        ]
        if not docs:
            return
        try:
            await self.images.insert_many(docs, ordered=False)
        except BulkWriteError as exc:
            if duplicate_indexes(exc) is None:  # duplicates: redeliveries, already stored
                raise

    async def note_processing(self, request_id: str, at: datetime) -> RequestDoc:
        return await self._upsert(request_id, {"$min": {"first_processed_at": at}})

    async def mark_completed(self, data: RequestCompleted, seen_at: datetime) -> RequestDoc:
        return await self._upsert(
            data.request_id,
            {
                "$set": {
                    "completed": {
                        "status": data.status,
                        "counts": data.counts.model_dump(),
                        "completed_at": data.completed_at,
                    },
                    "final_pending": True,
                },
                "$min": {"completed_seen_at": seen_at},
            },
        )

    async def _upsert(self, request_id: str, update: dict[str, Any]) -> RequestDoc:
        on_insert: dict[str, Any] = {"planned": []}
        if "received" not in update.get("$set", {}):
            on_insert["received"] = False
        doc = await self.requests.find_one_and_update(
            {"_id": request_id},
            {**update, "$setOnInsert": on_insert},
            upsert=True,
            return_document=ReturnDocument.AFTER,
        )
        assert doc is not None  # upsert with AFTER always returns the document
        return doc

    async def mark_planned(self, request_id: str, event_type: str) -> None:
        update: dict[str, Any] = {"$addToSet": {"planned": event_type}}
        if event_type in FINAL_TYPES:
            update["$set"] = {"final_pending": False}
        await self.requests.update_one({"_id": request_id}, update)

    async def pending_finals(self, request_ids: list[str]) -> list[RequestDoc]:
        """Those of these requests whose final webhook is not planned yet."""
        if not request_ids:
            return []
        cursor = self.requests.find({"_id": {"$in": request_ids}, "final_pending": True})
        return await cursor.to_list()

    async def overdue_finals(self, cutoff: datetime, limit: int = 100) -> list[RequestDoc]:
        """Received requests that completed before `cutoff` and whose final is not planned."""
        cursor = self.requests.find(
            {"final_pending": True, "received": True, "completed_seen_at": {"$lte": cutoff}}
        ).limit(limit)
        return await cursor.to_list()

    async def image_counts(self, request_id: str) -> tuple[int, int]:
        """(ok, failed) outcomes stored so far."""
        ok = await self.images.count_documents({"request_id": request_id, "outcome": "ok"})
        failed = await self.images.count_documents({"request_id": request_id, "outcome": "failed"})
        return ok, failed

    async def image_total(self, request_id: str) -> int:
        return await self.images.count_documents({"request_id": request_id})

    async def load_rows(self, request_id: str) -> list[Row]:
        cursor = self.rows.find({"request_id": request_id}).sort("chunk", ASCENDING)
        return [row for chunk in await cursor.to_list() for row in chunk["rows"]]

    async def image_bytes(self, request_id: str) -> list[ImageBytes]:
        """The ok images' output URL and sizes only: the final webhook's byte totals need
        them for requests of any size, also those too large to list products."""
        cursor = self.images.find(
            {"request_id": request_id, "outcome": "ok"},
            {"_id": 0, "output_url": 1, "bytes_in": 1, "bytes_out": 1},
        )
        return await cursor.to_list()

    async def load_images(self, request_id: str) -> list[ImageDoc]:
        return await self.images.find({"request_id": request_id}).to_list()
