"""The processor's own database: one `requests` doc per request, one `images` doc per image.

Round trips per image are counted (SecantusDB costs ~2.5 ms each): a job reads its
image by `_id`; outcomes that finish together are recorded in one bulk write, and each
request's counters move once per batch.

Every per-image filter names the `_id` (`<request_id>:<image_key>`). SecantusDB uses an
index only when the filter's fields are exactly the index's: `{request_id, image_key,
outcome: None}` scanned the whole collection (~20 ms per write at 7,000 images, growing
with every request ever processed). Docs written before `_id` was the key are still
found through the (request_id, image_key) index.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pymongo import ASCENDING, ReturnDocument, UpdateOne
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError

DUPLICATE_KEY = 11000
Doc = dict[str, Any]


def image_id(request_id: str, image_key: str) -> str:
    return f"{request_id}:{image_key}"


@dataclass(frozen=True)
class Outcome:
    """One image's outcome to record: `image_id` is the image doc's `_id`."""

    request_id: str
    image_id: Any
    fields: Mapping[str, Any]


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

    async def create_request(self, request_id: str, total: int, quality: int) -> Doc:
        """Create the request once; a redelivered RequestReceived gets the existing doc."""
        return await self.requests.find_one_and_update(
            {"_id": request_id},
            {
                "$setOnInsert": {
                    "total": total,
                    "quality": quality,
                    "ok": 0,
                    "failed": 0,
                    "fanned_out": False,
                    "completed_published": False,
                    "created_at": _now(),
                }
            },
            upsert=True,
            return_document=ReturnDocument.AFTER,
        )

    async def get_request(self, request_id: str) -> Doc | None:
        return await self.requests.find_one({"_id": request_id})

    async def mark_fanned_out(self, request_id: str) -> None:
        await self.requests.update_one({"_id": request_id}, {"$set": {"fanned_out": True}})

    async def add_counts(self, request_id: str, ok: int, failed: int) -> Doc:
        """Bump the counters by a batch's outcomes; returns the request after the bump."""
        return await self.requests.find_one_and_update(
            {"_id": request_id},
            {"$inc": {"ok": ok, "failed": failed}},
            return_document=ReturnDocument.AFTER,
        )

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
                    "completed_at": _now(),
                }
            },
        )

    # Images -----------------------------------------------------------------------

    async def insert_images(self, docs: Iterable[Mapping[str, Any]]) -> None:
        """Insert every image doc; the ones a previous delivery inserted are skipped."""
        documents = [
            {
                "_id": image_id(doc["request_id"], doc["image_key"]),
                **doc,
                "outcome": None,
                "created_at": _now(),
            }
            for doc in docs
        ]
        if not documents:
            return
        try:
            await self.images.insert_many(documents, ordered=False)
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            if any(error.get("code") != DUPLICATE_KEY for error in errors) or not errors:
                raise

    async def get_image(self, request_id: str, image_key: str) -> Doc | None:
        found = await self.images.find_one({"_id": image_id(request_id, image_key)})
        if found is None:  # a doc from before `_id` was the key (the exact index's filter)
            found = await self.images.find_one({"request_id": request_id, "image_key": image_key})
        return found

    async def record_outcome(
        self, request_id: str, image_key: str, fields: Mapping[str, Any]
    ) -> bool:
        """Set the outcome unless one is already there; True if this call set it."""
        outcome = Outcome(request_id, image_id(request_id, image_key), fields)
        [was_set] = await self.record_outcomes([outcome])
        return was_set

    async def record_outcomes(self, outcomes: Sequence[Outcome]) -> list[bool]:
        """Set each outcome unless one is already there, in one round trip; for each,
        True if this call set it.

        Each write carries its own token: when fewer docs changed than were sent (a
        duplicate job got there first, maybe in this very batch), the tokens read back
        tell which writes took effect."""
        if not outcomes:
            return []
        now, batch = _now(), uuid.uuid4().hex
        # One token per write, not per batch: a job and its duplicate may share a batch.
        tokens = [f"{batch}:{index}" for index in range(len(outcomes))]
        result = await self.images.bulk_write(
            [
                UpdateOne(
                    {"_id": o.image_id, "outcome": None},
                    {"$set": {**o.fields, "processed_at": now, "write_token": token}},
                )
                for o, token in zip(outcomes, tokens, strict=True)
            ],
            ordered=False,
        )
        if result.modified_count == len(outcomes):
            return [True] * len(outcomes)
        ids = list({o.image_id for o in outcomes})
        cursor = self.images.find({"_id": {"$in": ids}}, {"write_token": 1})
        written = {doc["write_token"] for doc in await cursor.to_list() if "write_token" in doc}
        return [token in written for token in tokens]

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


def _now() -> datetime:
    return datetime.now(UTC)
