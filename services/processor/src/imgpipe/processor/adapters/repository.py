"""The processor's own database: one `requests` doc per request, one `images` doc per image.

Round trips per image are counted (SecantusDB costs ~2.5 ms each): a job reads its
image, records the outcome, and bumps the request's counter; that's all.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from pymongo import ASCENDING, ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError

DUPLICATE_KEY = 11000
Doc = dict[str, Any]


class ProcessorRepository:
    def __init__(self, db: AsyncDatabase) -> None:
        self.requests = db["requests"]
        self.images = db["images"]

    async def ensure_indexes(self) -> None:
        await self.images.create_index(
            [("request_id", ASCENDING), ("image_key", ASCENDING)], unique=True
        )

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

    async def count_outcome(self, request_id: str, outcome: str) -> Doc:
        """Bump the request's `ok` or `failed` counter; returns the request after the bump."""
        return await self.requests.find_one_and_update(
            {"_id": request_id},
            {"$inc": {outcome: 1}},
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
        documents = [{**doc, "outcome": None, "created_at": _now()} for doc in docs]
        if not documents:
            return
        try:
            await self.images.insert_many(documents, ordered=False)
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            if any(error.get("code") != DUPLICATE_KEY for error in errors) or not errors:
                raise

    async def get_image(self, request_id: str, image_key: str) -> Doc | None:
        return await self.images.find_one({"request_id": request_id, "image_key": image_key})

    async def record_outcome(
        self, request_id: str, image_key: str, fields: Mapping[str, Any]
    ) -> bool:
        """Set the outcome unless one is already there; True if this call set it."""
        result = await self.images.update_one(
            {"request_id": request_id, "image_key": image_key, "outcome": None},
            {"$set": {**fields, "processed_at": _now()}},
        )
        return result.modified_count == 1

    async def count_outcomes(self, request_id: str) -> tuple[int, int]:
        """(ok, failed) counted from the images themselves: the truth the counters track."""
        ok = await self.images.count_documents({"request_id": request_id, "outcome": "ok"})
        failed = await self.images.count_documents({"request_id": request_id, "outcome": "failed"})
        return ok, failed


def _now() -> datetime:
    return datetime.now(UTC)
