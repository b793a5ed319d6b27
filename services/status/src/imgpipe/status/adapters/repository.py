"""The read model in MongoDB: one `requests` document per request."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pymongo import UpdateOne
from pymongo.asynchronous.database import AsyncDatabase

from imgpipe.status.handlers import Change


class StatusRepository:
    def __init__(self, database: AsyncDatabase) -> None:
        self.requests = database["requests"]

    async def get(self, request_id: str) -> dict[str, Any] | None:
        """The whole read path: one find by _id."""
        return await self.requests.find_one({"_id": request_id})

    async def write(self, changes: list[Change]) -> None:
        """One round trip for a batch, and one update per request in it.

        The cost of an update grows with the document (the rows of a 1,000-image request
        are large), so a burst of outcomes for one request is merged into a single update.
        Changes only `$set` distinct paths and `$max` one time, so merging them in
        delivery order gives the same document as applying them one by one.
        """
        if changes:
            await self.requests.bulk_write(merge(changes), ordered=True)


def merge(changes: list[Change]) -> list[UpdateOne]:
    fields: dict[str, dict[str, Any]] = {}
    latest: dict[str, datetime] = {}
    for change in changes:  # dicts keep first-seen order: requests stay in delivery order
        fields.setdefault(change.request_id, {}).update(change.fields)
        seen = latest.get(change.request_id)
        latest[change.request_id] = change.at if seen is None else max(seen, change.at)
    return [
        UpdateOne(
            {"_id": request_id},
            {"$set": fields[request_id], "$max": {"updated_at": latest[request_id]}},
            upsert=True,
        )
        for request_id in fields
    ]
