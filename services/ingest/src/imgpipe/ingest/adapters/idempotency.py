"""Idempotency keys in the ingest database (`idempotency_keys`).

One document per (scope, key): `_id` = "<scope>/<key>", the upload's `fingerprint`, a
`token` naming the upload that claimed it, `created_at`, and once the request is stored
its `request_id` and the `answer` (the 202 body, replayed as it was). The unique `_id`
makes the claim: of two uploads with one key, one insert wins.

A TTL index removes keys a day after `created_at`, and every lookup checks the age too:
a TTL monitor runs about once a minute (and an embedded server may run none).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar

from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError, PyMongoError

from imgpipe.contracts.mongo import Once
from imgpipe.ingest.domain import StoreUnavailable

IDEMPOTENCY_KEYS = "idempotency_keys"
KEY_LIFETIME = timedelta(hours=24)
Doc = dict[str, Any]
T = TypeVar("T")


class IdempotencyKeys:
    def __init__(self, db: AsyncDatabase) -> None:
        self.keys = db[IDEMPOTENCY_KEYS]
        self.ensure_indexes = Once(lambda: _guarded(self._create_indexes))

    async def _create_indexes(self) -> None:
        await self.keys.create_index(
            "created_at", expireAfterSeconds=int(KEY_LIFETIME.total_seconds())
        )
        await self.keys.create_index("request_id")  # forget's filter

    async def claim(self, key_id: str, fingerprint: str, token: str, now: datetime) -> bool:
        """Take the key for this upload; False if another upload holds it."""
        await self.ensure_indexes()
        doc = {
            "_id": key_id,
            "fingerprint": fingerprint,
            "token": token,
            "created_at": now,
            "request_id": None,
            "answer": None,
        }
        try:
            await self.keys.insert_one(doc)
        except DuplicateKeyError:
            return False
        except PyMongoError as exc:
            raise StoreUnavailable(str(exc)) from exc
        return True

    async def find(self, key_id: str) -> Doc | None:
        """The key's document as stored, even past its lifetime (the caller checks)."""
        doc: Doc | None = await _guarded(lambda: self.keys.find_one({"_id": key_id}))
        return doc

    async def complete(self, key_id: str, token: str, request_id: str, answer: Doc) -> None:
        """The claim's request is stored: later uploads with the key get `answer`."""
        update = {"$set": {"request_id": request_id, "answer": answer}}
        await _guarded(lambda: self.keys.update_one({"_id": key_id, "token": token}, update))

    async def forget(self, request_id: str) -> None:
        """Drop the keys that answer with a request (it was deleted): an upload with one
        of them is then a new upload."""
        await self.ensure_indexes()
        await _guarded(lambda: self.keys.delete_many({"request_id": request_id}))

    async def release(self, key_id: str, token: str) -> None:
        """Give the key up (only the claim `token` made): the next upload may take it."""
        await _guarded(lambda: self.keys.delete_one({"_id": key_id, "token": token}))


async def _guarded(operation: Callable[[], Awaitable[T]]) -> T:
    try:
        return await operation()
    except PyMongoError as exc:
        raise StoreUnavailable(str(exc)) from exc
