"""The delivery log (collection `deliveries`): one document per (request, endpoint,
webhook type, round), unique, with its attempts. `status`, `next_attempt_at` and the lease
live here, so retries survive restarts and instances share the work."""

from __future__ import annotations

import contextlib
from datetime import datetime
from typing import Any, TypedDict

from pymongo import ASCENDING, DESCENDING, ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError, OperationFailure

from imgpipe.notifier.webhooks import CANCELLED, PENDING, DeliveryStatus

Query = dict[str, Any]
# Newest first; seq keeps one planning pass's webhooks (same created_at) in lifecycle
# order, _id makes the order total so a cursor never skips or repeats a delivery.
LOG_ORDER = [("created_at", DESCENDING), ("seq", DESCENDING), ("_id", DESCENDING)]
UNIQUE_KEY = ("request_id", "endpoint", "event_type", "round")
# The unique index before rounds: a retry's webhooks would collide with the first run's.
OLD_UNIQUE_INDEX = "request_id_1_endpoint_1_event_type_1"


class AttemptDoc(TypedDict):
    at: datetime
    endpoint: str
    status_code: int | None
    latency_ms: float
    error: str | None
    outcome: str  # delivered, retry or failed
    next_retry_at: datetime | None


class DeliveryDoc(TypedDict, total=False):
    """A stored delivery; lists and leases leave out `body` or `attempts` when unused."""

    _id: str  # "dlv_<hex>"
    webhook_id: str  # the `webhook-id` header: the same on every retry
    request_id: str
    event_type: str
    round: int  # the run it tells of: 0, or N after the Nth retry
    seq: int  # its place in the request's lifecycle (webhooks.sequence)
    endpoint: str
    subscription_id: str | None  # None: the request's own webhook URL
    body: str  # the exact JSON sent, so every retry sends the same bytes
    status: DeliveryStatus
    tries: int  # attempts since it was made or last replayed
    attempts: list[AttemptDoc]
    next_attempt_at: datetime | None
    lease_until: datetime
    lease_owner: str | None
    created_at: datetime
    updated_at: datetime
    delivered_at: datetime | None


class Deliveries:
    def __init__(self, db: AsyncDatabase) -> None:
        self.collection = db["deliveries"]

    async def ensure_indexes(self) -> None:
        if OLD_UNIQUE_INDEX in await self.collection.index_information():
            # Deliveries made before rounds are round 0's.
            await self.collection.update_many({"round": {"$exists": False}}, {"$set": {"round": 0}})
            with contextlib.suppress(OperationFailure):  # another instance dropped it
                await self.collection.drop_index(OLD_UNIQUE_INDEX)
        await self.collection.create_index([(k, ASCENDING) for k in UNIQUE_KEY], unique=True)
        await self.collection.create_index([("status", ASCENDING), ("next_attempt_at", 1)])
        await self.collection.create_index("subscription_id")
        # The delivery log is listed newest first, in this order (see list_page).
        await self.collection.create_index(LOG_ORDER)

    async def add(self, doc: DeliveryDoc) -> bool:
        """Insert unless this (request, endpoint, type, round) exists; True when it is new."""
        key = {
            "request_id": doc["request_id"],
            "endpoint": doc["endpoint"],
            "event_type": doc["event_type"],
            "round": doc["round"],
        }
        try:
            result = await self.collection.update_one(key, {"$setOnInsert": doc}, upsert=True)
        except DuplicateKeyError:  # a concurrent upsert of the same key won
            return False
        return result.upserted_id is not None

    async def get(self, delivery_id: str) -> DeliveryDoc | None:
        return await self.collection.find_one({"_id": delivery_id})

    async def list_page(
        self,
        request_id: str | None,
        status: str | None,
        endpoint: str | None,
        limit: int,
        before: DeliveryDoc | None = None,
    ) -> list[DeliveryDoc]:
        """Newest first; `before` (a delivery, or just a `created_at`) lists older ones."""
        query: Query = {}
        if request_id:
            query["request_id"] = request_id
        if status:
            query["status"] = status
        if endpoint:
            query["endpoint"] = endpoint
        if before is not None:
            query.update(_older_than(before))
        cursor = self.collection.find(query).sort(LOG_ORDER)
        return await cursor.limit(limit).to_list()

    # Dispatching ---------------------------------------------------------------------

    async def due(
        self, now: datetime, limit: int, exclude_endpoints: list[str]
    ) -> list[DeliveryDoc]:
        query: Query = {
            "status": PENDING,
            "next_attempt_at": {"$lte": now},
            "lease_until": {"$lte": now},
        }
        if exclude_endpoints:
            query["endpoint"] = {"$nin": exclude_endpoints}
        cursor = self.collection.find(query, {"body": 0, "attempts": 0})
        return await cursor.sort("next_attempt_at", ASCENDING).limit(limit).to_list()

    async def pending_predecessor(self, doc: DeliveryDoc) -> DeliveryDoc | None:
        """An earlier webhook for the same request and endpoint that is not done yet."""
        return await self.collection.find_one(
            {
                "request_id": doc["request_id"],
                "endpoint": doc["endpoint"],
                "seq": {"$lt": doc["seq"]},
                "status": PENDING,
            },
            {"next_attempt_at": 1, "lease_until": 1},
        )

    async def defer(self, delivery_id: str, until: datetime) -> None:
        await self.collection.update_one(
            {"_id": delivery_id, "status": PENDING}, {"$set": {"next_attempt_at": until}}
        )

    async def make_due(self, query: Query, now: datetime) -> None:
        """Bring pending deliveries forward to now (never push one later)."""
        await self.collection.update_many(
            {**query, "status": PENDING}, {"$min": {"next_attempt_at": now}}
        )

    async def release_successors(self, doc: DeliveryDoc, now: datetime) -> None:
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
    ) -> DeliveryDoc | None:
        """Take a lease so no other notifier instance attempts the same delivery."""
        return await self.collection.find_one_and_update(
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
        self, delivery_id: str, owner: str, attempt: AttemptDoc, fields: Query, now: datetime
    ) -> bool:
        """Log the attempt and its outcome, and drop the lease; False if the lease was lost."""
        result = await self.collection.update_one(
            {"_id": delivery_id, "lease_owner": owner, "status": PENDING},
            {
                "$push": {"attempts": attempt},
                "$inc": {"tries": 1},
                "$set": {**fields, "lease_until": now, "updated_at": now},
            },
        )
        return result.modified_count == 1

    async def release(self, delivery_id: str, owner: str, now: datetime) -> None:
        await self.collection.update_one(
            {"_id": delivery_id, "lease_owner": owner}, {"$set": {"lease_until": now}}
        )

    async def delete_for_request(self, request_id: str) -> int:
        """A deleted request's deliveries, log and pending retries alike; how many."""
        result = await self.collection.delete_many({"request_id": request_id})
        return result.deleted_count

    # Replays and deleted subscriptions -----------------------------------------------

    async def replay(
        self, delivery_id: str, now: datetime, subscription_id: str | None = None
    ) -> DeliveryDoc | None:
        """Pending again and due now, with a fresh retry budget; the log is kept.
        `subscription_id` links it to the subscription that covers it now."""
        fields: Query = {"status": PENDING, "next_attempt_at": now, "tries": 0, "updated_at": now}
        if subscription_id is not None:
            fields["subscription_id"] = subscription_id
        return await self.collection.find_one_and_update(
            {"_id": delivery_id}, {"$set": fields}, return_document=ReturnDocument.AFTER
        )

    async def reassign_pending(
        self, subscription_id: str, event_type: str, heir_id: str, now: datetime
    ) -> None:
        """Link a subscription's pending deliveries of one type to another subscription."""
        await self.collection.update_many(
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
        docs = await self.collection.find(query, {"attempts": 0, "body": 0}).to_list()
        await self.collection.update_many(
            query, {"$set": {"status": CANCELLED, "next_attempt_at": None, "updated_at": now}}
        )
        for doc in docs:  # later webhooks to the same URL need not wait for these
            await self.release_successors(doc, now)


def _older_than(before: DeliveryDoc) -> Query:
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
