"""What the notifier learned about each request from events, in three collections,
and what it forgot on purpose in a fourth.

- `requests`: one document per request, its current round (0, then N after the Nth
  retry), how its latest run ended, and which webhook types of which round it has
  already planned (so a duplicate event never plans again).
- `rows`: the request's CSV rows from RequestReceived, in chunks (a 100k-row request
  would not fit one document).
- `images`: one document per image, to count outcomes and build the final product
  list: inserted from its first ImageProcessed, replaced only by a later round's.
- `deleted`: a tombstone per deleted request (RequestDeleted), named by a hash of its
  id, so late or redelivered events of it are dropped instead of bringing it back.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any, Literal, NotRequired, TypedDict

from pymongo import ASCENDING, ReplaceOne, ReturnDocument, UpdateOne
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError

from imgpipe.contracts.events import (
    ImageProcessed,
    RequestCancelled,
    RequestCompleted,
    RequestReceived,
    RetryStarted,
)
from imgpipe.contracts.mongo import duplicate_indexes, insert_new
from imgpipe.contracts.products import ByteTally, ByteTotals
from imgpipe.notifier.webhooks import FINAL_TYPES, planned_key

ROWS_PER_CHUNK = 1000
IMAGE_BATCH = 1000  # outcomes per round trip when tallying a request's bytes
# How long a deleted request's events are dropped: longer than any redelivery takes.
TOMBSTONE_DAYS = 30

Query = dict[str, Any]


class Completion(TypedDict):
    """How a run ended: RequestCompleted, or RequestCancelled (status `cancelled`)."""

    status: Literal["completed", "error", "cancelled"]
    counts: dict[str, int]  # total, ok, failed
    completed_at: datetime  # or cancelled_at


class Retry(TypedDict):
    """The latest RetryStarted."""

    round: int
    images: int  # how many images run again
    started_at: datetime


class RequestDoc(TypedDict):
    """A request as the notifier knows it; each field arrives with its own event."""

    _id: str
    planned: list[str]  # webhook types planned so far
    received: bool  # RequestReceived seen: the rows and the webhook URL are here
    webhook_url: NotRequired[str | None]
    image_count: NotRequired[int]
    received_at: NotRequired[datetime]
    first_processed_at: NotRequired[datetime]  # the earliest ImageProcessed's time
    round: NotRequired[int]  # the latest run: 0, or N after RetryStarted / end of round N
    retry: NotRequired[Retry]
    completed: NotRequired[Completion]  # how the run `completed_round` ended
    completed_round: NotRequired[int]  # absent on documents older than rounds: 0
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
    round: NotRequired[int]  # the run that gave this outcome (absent: 0)
    # Sizes of an ok image; absent from images stored before the notifier kept them.
    bytes_in: NotRequired[int | None]
    bytes_out: NotRequired[int | None]


class Requests:
    def __init__(self, db: AsyncDatabase) -> None:
        self.requests = db["requests"]
        self.rows = db["rows"]
        self.images = db["images"]
        self.deleted = db["deleted"]

    async def ensure_indexes(self) -> None:
        await self.images.create_index("request_id")
        await self.images.create_index([("request_id", ASCENDING), ("round", ASCENDING)])
        await self.deleted.create_index("deleted_at", expireAfterSeconds=TOMBSTONE_DAYS * 86400)
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
        """Store the images of a batch of ImageProcessed in few round trips.

        Within a round an image's outcome never changes (a redelivered ImageProcessed
        carries the stored one), so a first-run image already here is skipped: inserts
        cost SecantusDB a fifth of upserts. A retry's outcome replaces the image's unless
        one of the same or a later round is stored: the highest round wins."""
        first = [_image_doc(data) for data in batch if not data.round]
        again = [data for data in batch if data.round]
        await insert_new(self.images, first)  # duplicates: redeliveries, already stored
        if again:
            # Unordered: the filter alone keeps the highest round, whatever runs first.
            writes = [
                ReplaceOne(
                    {"_id": doc["_id"], "round": {"$not": {"$gte": doc["round"]}}},
                    doc,
                    upsert=True,
                )
                for doc in map(_image_doc, again)
            ]
            try:
                await self.images.bulk_write(writes, ordered=False)
            except BulkWriteError as exc:
                # A duplicate key: that round or a later one is stored already.
                if duplicate_indexes(exc) is None:
                    raise

    async def note_processing(self, request_id: str, at: datetime) -> RequestDoc:
        return await self._upsert(request_id, {"$min": {"first_processed_at": at}})

    async def mark_completed(self, data: RequestCompleted, seen_at: datetime) -> RequestDoc:
        completion: Completion = {
            "status": data.status,
            "counts": data.counts.model_dump(),
            "completed_at": data.completed_at,
        }
        return await self._end_round(data.request_id, data.round, completion, seen_at)

    async def mark_cancelled(self, data: RequestCancelled, seen_at: datetime) -> RequestDoc:
        completion: Completion = {
            "status": "cancelled",
            "counts": data.counts.model_dump(),
            "completed_at": data.cancelled_at,
        }
        return await self._end_round(data.request_id, data.round, completion, seen_at)

    async def _end_round(
        self, request_id: str, round: int, completion: Completion, seen_at: datetime
    ) -> RequestDoc:
        """The run `round` ended: unless a later round is known, or this round's end is
        already stored (a redelivery changes nothing, not even the grace's start)."""
        newer: Query = {
            "$or": [
                {"round": {"$not": {"$gte": round}}},
                {"round": round, "completed_round": {"$ne": round}},
            ]
        }
        update = {
            "$set": {
                "round": round,
                "completed": completion,
                "completed_round": round,
                "final_pending": True,
                "completed_seen_at": seen_at,
            }
        }
        return await self._advance(request_id, newer, update)

    async def start_retry(self, data: RetryStarted) -> RequestDoc:
        """Round N runs: unless round N (or a later one) is known already."""
        retry: Retry = {
            "round": data.round,
            "images": len(set(data.image_keys)),
            "started_at": data.started_at,
        }
        newer: Query = {"round": {"$not": {"$gte": data.round}}}
        update = {"$set": {"round": data.round, "retry": retry}}
        return await self._advance(data.request_id, newer, update)

    async def _advance(self, request_id: str, newer: Query, update: Query) -> RequestDoc:
        """Apply `update` if the request document matches `newer`; the document either way.
        One round trip when the request is known (the usual case), three at most."""
        doc = await self.requests.find_one_and_update(
            {"_id": request_id, **newer}, update, return_document=ReturnDocument.AFTER
        )
        if doc is not None:
            return doc
        known = await self._upsert(request_id, {})
        doc = await self.requests.find_one_and_update(
            {"_id": request_id, **newer}, update, return_document=ReturnDocument.AFTER
        )
        return doc if doc is not None else known

    async def _upsert(self, request_id: str, update: dict[str, Any]) -> RequestDoc:
        on_insert: dict[str, Any] = {"planned": [], "round": 0}
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

    async def mark_planned(self, request_id: str, event_type: str, round: int = 0) -> None:
        await self.requests.update_one(
            {"_id": request_id}, {"$addToSet": {"planned": planned_key(event_type, round)}}
        )
        if event_type in FINAL_TYPES:  # unless a later round has ended meanwhile
            await self.requests.update_one(
                {"_id": request_id, "completed_round": {"$not": {"$gt": round}}},
                {"$set": {"final_pending": False}},
            )

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

    async def round_image_total(self, request_id: str, round: int) -> int:
        """Outcomes stored from run `round` (a retry's images)."""
        return await self.images.count_documents({"request_id": request_id, "round": round})

    async def load_rows(self, request_id: str) -> list[Row]:
        cursor = self.rows.find({"request_id": request_id}).sort("chunk", ASCENDING)
        return [row for chunk in await cursor.to_list() for row in chunk["rows"]]

    async def image_bytes(self, request_id: str) -> ByteTotals:
        """The final webhook's byte totals, for requests of any size, also those too
        large to list products: the ok images' output URL and sizes only, tallied as the
        cursor reads them (in batches), so that the outcomes are never all in memory."""
        cursor = self.images.find(
            {"request_id": request_id, "outcome": "ok"},
            {"_id": 0, "output_url": 1, "bytes_in": 1, "bytes_out": 1},
            batch_size=IMAGE_BATCH,
        )
        tally = ByteTally()
        async for image in cursor:
            tally.add(image)
        return tally.totals()

    async def load_images(self, request_id: str) -> list[ImageDoc]:
        return await self.images.find({"request_id": request_id}).to_list()

    # Deletion --------------------------------------------------------------------------

    async def forget(self, request_id: str, at: datetime) -> None:
        """Drop what is stored of the request; its tombstone first, so an event of it
        handled meanwhile is dropped too."""
        await self.deleted.update_one(
            {"_id": tombstone_id(request_id)}, {"$set": {"deleted_at": at}}, upsert=True
        )
        await self.images.delete_many({"request_id": request_id})
        await self.rows.delete_many({"request_id": request_id})
        await self.requests.delete_one({"_id": request_id})

    async def deleted_among(self, request_ids: list[str]) -> set[str]:
        """Those of these requests that were deleted."""
        if not request_ids:
            return set()
        by_tombstone = {tombstone_id(request_id): request_id for request_id in request_ids}
        cursor = self.deleted.find({"_id": {"$in": list(by_tombstone)}}, {"_id": 1})
        return {by_tombstone[doc["_id"]] for doc in await cursor.to_list()}


def tombstone_id(request_id: str) -> str:
    """A deleted request's tombstone does not hold its id, only this hash of it."""
    return "del_" + hashlib.sha256(request_id.encode()).hexdigest()


def _image_doc(data: ImageProcessed) -> ImageDoc:
    return {
        "_id": f"{data.request_id}:{data.image_key}",
        "request_id": data.request_id,
        "key": data.image_key,
        "outcome": data.outcome,
        "output_url": data.output_url,
        "error": data.error.model_dump() if data.error else None,
        "attempts": data.attempts,
        "round": data.round,
        "bytes_in": data.bytes_in,
        "bytes_out": data.bytes_out,
    }
