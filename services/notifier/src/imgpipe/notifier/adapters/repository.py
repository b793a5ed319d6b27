"""The notifier's own MongoDB database: request facts, subscriptions, deliveries.

Collections:
- `requests`: what the notifier learned about each request from events, and
  which webhook types it has already planned (so duplicates never re-plan).
- `rows`: the request's CSV rows from RequestReceived, in chunks (a 100k-row
  request would not fit one document).
- `images`: one document per image (inserted once, from its first ImageProcessed),
  to count outcomes and build the final product list.
- `subscriptions`: endpoints registered through the API.
- `deliveries`: one document per (request, endpoint, webhook type), unique, with
  its attempt log; `next_attempt_at` and the lease make retries survive restarts.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pymongo import ASCENDING, DESCENDING, ReturnDocument, UpdateOne
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError, DuplicateKeyError

from imgpipe.contracts.events import ImageProcessed, RequestCompleted, RequestReceived
from imgpipe.notifier.webhooks import CANCELLED, FINAL_TYPES, PENDING

Doc = dict[str, Any]
ROWS_PER_CHUNK = 1000
# Newest first; seq keeps one planning pass's webhooks (same created_at) in lifecycle
# order, _id makes the order total so a cursor never skips or repeats a delivery.
LOG_ORDER = [("created_at", DESCENDING), ("seq", DESCENDING), ("_id", DESCENDING)]
DUPLICATE_KEY = 11000


class Repository:
    def __init__(self, db: AsyncDatabase) -> None:
        self.db = db
        self.requests = db["requests"]
        self.rows = db["rows"]
        self.images = db["images"]
        self.subscriptions = db["subscriptions"]
        self.deliveries = db["deliveries"]

    async def ensure_indexes(self) -> None:
        await self.images.create_index("request_id")
        # image_counts' filter, field for field (SecantusDB uses an index only then).
        await self.images.create_index([("request_id", ASCENDING), ("outcome", ASCENDING)])
        await self.rows.create_index([("request_id", ASCENDING), ("chunk", ASCENDING)])
        await self.requests.create_index([("final_pending", ASCENDING), ("completed_seen_at", 1)])
        await self.subscriptions.create_index("event_types")
        await self.deliveries.create_index(
            [("request_id", ASCENDING), ("endpoint", ASCENDING), ("event_type", ASCENDING)],
            unique=True,
        )
        await self.deliveries.create_index([("status", ASCENDING), ("next_attempt_at", 1)])
        await self.deliveries.create_index("subscription_id")
        # The delivery log is listed newest first, in this order (see list_deliveries).
        await self.deliveries.create_index(LOG_ORDER)

    # Request facts -----------------------------------------------------------------

    async def mark_received(self, data: RequestReceived) -> Doc:
        """Store the rows first, then the flag: whoever sees `received` finds the rows."""
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
        return await self._upsert_request(
            data.request_id,
            {
                "$set": {
                    "received": True,
                    "webhook_url": data.webhook_url,
                    "image_count": data.image_count,
                    "received_at": data.received_at,
                }
            },
        )

    async def store_images(self, batch: list[ImageProcessed]) -> None:
        """Insert the images of a batch of ImageProcessed in one round trip.

        An image's outcome never changes (a redelivered ImageProcessed carries the stored
        one), so one already here is skipped: inserts cost SecantusDB a fifth of upserts."""
        docs = [
            {
                "_id": f"{data.request_id}:{data.image_key}",
                "request_id": data.request_id,
                "key": data.image_key,
                "outcome": data.outcome,
                "output_url": data.output_url,
                "error": data.error.model_dump() if data.error else None,
                "attempts": data.attempts,
            }
            for data in batch
        ]
        if not docs:
            return
        try:
            await self.images.insert_many(docs, ordered=False)
        except BulkWriteError as exc:
            if not _only_duplicates(exc):
                raise

    async def note_processing(self, request_id: str, at: datetime) -> Doc:
        return await self._upsert_request(request_id, {"$min": {"first_processed_at": at}})

    async def pending_finals(self, request_ids: list[str]) -> list[Doc]:
        """Those of these requests whose final webhook is not planned yet."""
        if not request_ids:
            return []
        cursor = self.requests.find({"_id": {"$in": request_ids}, "final_pending": True})
        return await cursor.to_list()

    async def mark_completed(self, data: RequestCompleted, seen_at: datetime) -> Doc:
        return await self._upsert_request(
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

    async def _upsert_request(self, request_id: str, update: Doc) -> Doc:
        on_insert: Doc = {"planned": []}
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
        update: Doc = {"$addToSet": {"planned": event_type}}
        if event_type in FINAL_TYPES:
            update["$set"] = {"final_pending": False}
        await self.requests.update_one({"_id": request_id}, update)

    async def overdue_finals(self, cutoff: datetime, limit: int = 100) -> list[Doc]:
        cursor = self.requests.find(
            {"final_pending": True, "received": True, "completed_seen_at": {"$lte": cutoff}}
        ).limit(limit)
        return await cursor.to_list()

    async def image_counts(self, request_id: str) -> tuple[int, int]:
        ok = await self.images.count_documents({"request_id": request_id, "outcome": "ok"})
        failed = await self.images.count_documents({"request_id": request_id, "outcome": "failed"})
        return ok, failed

    async def image_total(self, request_id: str) -> int:
        return await self.images.count_documents({"request_id": request_id})

    async def load_rows(self, request_id: str) -> list[Doc]:
        cursor = self.rows.find({"request_id": request_id}).sort("chunk", ASCENDING)
        return [row for chunk in await cursor.to_list() for row in chunk["rows"]]

    async def load_images(self, request_id: str) -> list[Doc]:
        return await self.images.find({"request_id": request_id}).to_list()

    # Subscriptions -------------------------------------------------------------------

    async def add_subscription(self, doc: Doc) -> None:
        await self.subscriptions.insert_one(doc)

    async def list_subscriptions(self) -> list[Doc]:
        return await self.subscriptions.find().sort("created_at", ASCENDING).to_list()

    async def get_subscription(self, subscription_id: str) -> Doc | None:
        return await self.subscriptions.find_one({"_id": subscription_id})

    async def delete_subscription(self, subscription_id: str) -> Doc | None:
        """The deleted subscription, None when there was none."""
        return await self.subscriptions.find_one_and_delete({"_id": subscription_id})

    async def subscriptions_for(self, event_type: str) -> list[Doc]:
        cursor = self.subscriptions.find({"event_types": event_type})
        return await cursor.sort("created_at", ASCENDING).to_list()

    # Deliveries ----------------------------------------------------------------------

    async def add_delivery(self, doc: Doc) -> bool:
        """Insert unless this (request, endpoint, type) exists; True when it is new."""
        key = {k: doc[k] for k in ("request_id", "endpoint", "event_type")}
        try:
            result = await self.deliveries.update_one(key, {"$setOnInsert": doc}, upsert=True)
        except DuplicateKeyError:  # a concurrent upsert of the same key won
            return False
        return result.upserted_id is not None

    async def due(self, now: datetime, limit: int, exclude_endpoints: list[str]) -> list[Doc]:
        query: Doc = {
            "status": PENDING,
            "next_attempt_at": {"$lte": now},
            "lease_until": {"$lte": now},
        }
        if exclude_endpoints:
            query["endpoint"] = {"$nin": exclude_endpoints}
        cursor = self.deliveries.find(query, {"body": 0, "attempts": 0})
        return await cursor.sort("next_attempt_at", ASCENDING).limit(limit).to_list()

    async def pending_predecessor(self, doc: Doc) -> Doc | None:
        """An earlier webhook for the same request and endpoint that is not done yet."""
        return await self.deliveries.find_one(
            {
                "request_id": doc["request_id"],
                "endpoint": doc["endpoint"],
                "seq": {"$lt": doc["seq"]},
                "status": PENDING,
            },
            {"next_attempt_at": 1, "lease_until": 1},
        )

    async def defer(self, delivery_id: str, until: datetime) -> None:
        await self.deliveries.update_one(
            {"_id": delivery_id, "status": PENDING}, {"$set": {"next_attempt_at": until}}
        )

    async def make_due(self, query: Doc, now: datetime) -> None:
        """Bring pending deliveries forward to now (never push one later)."""
        await self.deliveries.update_many(
            {**query, "status": PENDING}, {"$min": {"next_attempt_at": now}}
        )

    async def release_successors(self, doc: Doc, now: datetime) -> None:
        await self.make_due(
            {
                "request_id": doc["request_id"],
                "endpoint": doc["endpoint"],
                "seq": {"$gt": doc["seq"]},
            },
            now,
        )

    async def claim(
        self, delivery_id: str, owner: str, now: datetime, until: datetime
    ) -> Doc | None:
        """Take a lease so no other notifier instance attempts the same delivery."""
        return await self.deliveries.find_one_and_update(
            {
                "_id": delivery_id,
                "status": PENDING,
                "next_attempt_at": {"$lte": now},
                "lease_until": {"$lte": now},
            },
            {"$set": {"lease_until": until, "lease_owner": owner}},
            projection={"attempts": 0},
            return_document=ReturnDocument.AFTER,
        )

    async def finish_attempt(
        self, delivery_id: str, owner: str, attempt: Doc, fields: Doc, now: datetime
    ) -> bool:
        """Log the attempt and its outcome, and drop the lease; False if the lease was lost."""
        result = await self.deliveries.update_one(
            {"_id": delivery_id, "lease_owner": owner, "status": PENDING},
            {
                "$push": {"attempts": attempt},
                "$inc": {"tries": 1},
                "$set": {**fields, "lease_until": now, "updated_at": now},
            },
        )
        return result.modified_count == 1

    async def release(self, delivery_id: str, owner: str, now: datetime) -> None:
        await self.deliveries.update_one(
            {"_id": delivery_id, "lease_owner": owner}, {"$set": {"lease_until": now}}
        )

    async def list_deliveries(
        self,
        request_id: str | None,
        status: str | None,
        endpoint: str | None,
        limit: int,
        before: Doc | None = None,
    ) -> list[Doc]:
        """Newest first; `before` (a delivery, or just a `created_at`) lists older ones."""
        query: Doc = {}
        if request_id:
            query["request_id"] = request_id
        if status:
            query["status"] = status
        if endpoint:
            query["endpoint"] = endpoint
        if before is not None:
            query.update(_older_than(before))
        cursor = self.deliveries.find(query).sort(LOG_ORDER)
        return await cursor.limit(limit).to_list()

    async def get_delivery(self, delivery_id: str) -> Doc | None:
        return await self.deliveries.find_one({"_id": delivery_id})

    async def replay(
        self, delivery_id: str, now: datetime, subscription_id: str | None = None
    ) -> Doc | None:
        """Pending again and due now, with a fresh retry budget; the log is kept.
        `subscription_id` links it to the subscription that covers it now."""
        fields: Doc = {"status": PENDING, "next_attempt_at": now, "tries": 0, "updated_at": now}
        if subscription_id is not None:
            fields["subscription_id"] = subscription_id
        return await self.deliveries.find_one_and_update(
            {"_id": delivery_id}, {"$set": fields}, return_document=ReturnDocument.AFTER
        )

    async def reassign_pending(
        self, subscription_id: str, event_type: str, heir_id: str, now: datetime
    ) -> None:
        """Link a subscription's pending deliveries of one type to another subscription."""
        await self.deliveries.update_many(
            {"subscription_id": subscription_id, "event_type": event_type, "status": PENDING},
            {"$set": {"subscription_id": heir_id, "updated_at": now}},
        )

    async def cancel_for_subscription(
        self, subscription_id: str, event_types: list[str], now: datetime
    ) -> None:
        """No more attempts for these pending deliveries of a deleted subscription; the
        delivery log stays."""
        query = {
            "subscription_id": subscription_id,
            "event_type": {"$in": event_types},
            "status": PENDING,
        }
        docs = await self.deliveries.find(query, {"attempts": 0, "body": 0}).to_list()
        await self.deliveries.update_many(
            query, {"$set": {"status": CANCELLED, "next_attempt_at": None, "updated_at": now}}
        )
        for doc in docs:  # later webhooks to the same URL need not wait for these
            await self.release_successors(doc, now)


def _older_than(before: Doc) -> Doc:
    """Deliveries after `before` in LOG_ORDER; only `created_at` when it is just a time."""
    created_at = before["created_at"]
    if "_id" not in before:
        return {"created_at": {"$lt": created_at}}
    return {
        "$or": [
            {"created_at": {"$lt": created_at}},
            {"created_at": created_at, "seq": {"$lt": before["seq"]}},
            {"created_at": created_at, "seq": before["seq"], "_id": {"$lt": before["_id"]}},
        ]
    }


def _only_duplicates(exc: BulkWriteError) -> bool:
    details = exc.details or {}
    errors = details.get("writeErrors") or []
    if details.get("writeConcernErrors"):
        return False
    return bool(errors) and all(error.get("code") == DUPLICATE_KEY for error in errors)
