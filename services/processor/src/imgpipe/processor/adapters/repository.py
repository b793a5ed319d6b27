"""The processor's own database: one `requests` doc per request, one `images` doc per
image outcome.

Round trips per image are counted (SecantusDB spends ~0.5 ms per round trip, ~0.1 ms
per inserted document and ~0.5 ms per updated one): a job reads its images in one
query by `_id` (`<request_id>:<image_key>`), and outcomes that finish together are
inserted in one bulk write, each request's counters moving once per batch. An image
doc is written only once its outcome is known, so recording is an insert: a duplicate
key means another delivery recorded that image first, and its outcome stands.

SecantusDB uses an index only when the filter's fields are exactly the index's, so
every per-image filter names the `_id` alone.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pymongo import ASCENDING, ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError

from imgpipe.contracts.events import Options, utcnow
from imgpipe.contracts.mongo import duplicate_indexes

Doc = dict[str, Any]


def image_id(request_id: str, image_key: str) -> str:
    return f"{request_id}:{image_key}"


@dataclass(frozen=True)
class Outcome:
    """One image's outcome to record: `fields` is all its doc holds but the `_id`."""

    request_id: str
    image_key: str
    fields: Mapping[str, Any]

    @property
    def image_id(self) -> str:
        return image_id(self.request_id, self.image_key)


class ProcessorRepository:
    def __init__(self, db: AsyncDatabase) -> None:
        self.requests = db["requests"]
        self.images = db["images"]

    async def ensure_indexes(self) -> None:
        await self.images.create_index(
            [("request_id", ASCENDING), ("image_key", ASCENDING)], unique=True
        )
        # count_outcomes' filter, field for field: counting walks one request's entries.
        await self.images.create_index([("request_id", ASCENDING), ("outcome", ASCENDING)])

    # Requests ---------------------------------------------------------------------

    async def create_request(
        self, request_id: str, total: int, options: Options, traceparent: str | None = None
    ) -> Doc:
        """Create the request once; a redelivered RequestReceived gets the existing doc.
        `traceparent`: the request's trace, for its RequestCompleted."""
        doc = await self.requests.find_one_and_update(
            {"_id": request_id},
            {
                "$setOnInsert": {
                    "total": total,
                    "options": options.model_dump(),
                    "ok": 0,
                    "failed": 0,
                    "fanned_out": False,
                    "completed_published": False,
                    "created_at": utcnow(),
                    "traceparent": traceparent,
                }
            },
            upsert=True,
            return_document=ReturnDocument.AFTER,
        )
        assert doc is not None  # an upsert returning the document after it has one
        return doc

    async def get_request(self, request_id: str) -> Doc | None:
        return await self.requests.find_one({"_id": request_id})

    async def mark_fanned_out(self, request_id: str) -> None:
        await self.requests.update_one({"_id": request_id}, {"$set": {"fanned_out": True}})

    async def add_counts(self, request_id: str, ok: int, failed: int) -> Doc:
        """Bump the counters by a batch's outcomes; returns the request after the bump."""
        doc = await self.requests.find_one_and_update(
            {"_id": request_id},
            {"$inc": {"ok": ok, "failed": failed}},
            return_document=ReturnDocument.AFTER,
        )
        if doc is None:  # outcomes are recorded only for requests that exist
            raise LookupError(f"no request {request_id}")
        return doc

    async def raise_counters(self, request_id: str, ok: int, failed: int) -> Doc | None:
        """Catch counters up with counted outcomes. $max, not $set: a concurrent $inc
        for an image counted here would otherwise be lost and the request never finish."""
        return await self.requests.find_one_and_update(
            {"_id": request_id},
            {"$max": {"ok": ok, "failed": failed}},
            return_document=ReturnDocument.AFTER,
        )

    async def mark_completed(self, request_id: str, ok: int, failed: int) -> None:
        await self.requests.update_one(
            {"_id": request_id},
            {
                "$set": {
                    "completed_published": True,
                    "ok": ok,
                    "failed": failed,
                    "completed_at": utcnow(),
                }
            },
        )

    # Images -----------------------------------------------------------------------

    async def get_images(self, request_id: str, image_keys: Sequence[str]) -> dict[str, Doc]:
        """The images among `image_keys` whose outcome is recorded, by image key."""
        ids = [image_id(request_id, key) for key in image_keys]
        docs = await self.images.find({"_id": {"$in": ids}}).to_list()
        return {doc["image_key"]: doc for doc in docs}

    async def record_outcomes(self, outcomes: Sequence[Outcome]) -> list[bool]:
        """Store each outcome unless the image has one already, in one round trip; for
        each, True if this call stored it."""
        if not outcomes:
            return []
        now = utcnow()
        docs = [{"_id": o.image_id, **o.fields, "processed_at": now} for o in outcomes]
        try:
            await self.images.insert_many(docs, ordered=False)
        except BulkWriteError as exc:
            taken = duplicate_indexes(exc)
            if taken is None:
                raise
            return [index not in taken for index in range(len(docs))]
        return [True] * len(outcomes)

    async def count_batch(self, outcomes: Sequence[Outcome]) -> dict[str, Doc]:
        """One counter bump per request for outcomes just recorded; request id -> request."""
        tally: dict[str, Counter[str]] = {}
        for o in outcomes:
            tally.setdefault(o.request_id, Counter())[o.fields["outcome"]] += 1
        return {
            request_id: await self.add_counts(request_id, counts["ok"], counts["failed"])
            for request_id, counts in tally.items()
        }

    async def count_outcomes(self, request_id: str) -> tuple[int, int]:
        """(ok, failed) counted from the images themselves: the truth the counters track."""
        ok = await self.images.count_documents({"request_id": request_id, "outcome": "ok"})
        failed = await self.images.count_documents({"request_id": request_id, "outcome": "failed"})
        return ok, failed
