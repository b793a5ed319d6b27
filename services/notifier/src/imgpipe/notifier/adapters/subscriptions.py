"""Endpoints registered through the API (collection `subscriptions`)."""

from __future__ import annotations

from datetime import datetime
from typing import TypedDict

from pymongo import ASCENDING
from pymongo.asynchronous.database import AsyncDatabase


class SubscriptionDoc(TypedDict):
    _id: str  # "sub_<hex>"
    url: str  # normalised (subscriptions.normalise_url)
    event_types: list[str]
    created_at: datetime


class Subscriptions:
    def __init__(self, db: AsyncDatabase) -> None:
        self.collection = db["subscriptions"]

    async def ensure_indexes(self) -> None:
        await self.collection.create_index("event_types")

    async def add(self, doc: SubscriptionDoc) -> None:
        await self.collection.insert_one(doc)

    async def list_all(self) -> list[SubscriptionDoc]:
        return await self.collection.find().sort("created_at", ASCENDING).to_list()

    async def get(self, subscription_id: str) -> SubscriptionDoc | None:
        return await self.collection.find_one({"_id": subscription_id})

    async def delete(self, subscription_id: str) -> SubscriptionDoc | None:
        """The deleted subscription, None when there was none."""
        return await self.collection.find_one_and_delete({"_id": subscription_id})

    async def wanting(self, event_type: str) -> list[SubscriptionDoc]:
        """The subscriptions that want `event_type`, oldest first."""
        cursor = self.collection.find({"event_types": event_type})
        return await cursor.sort("created_at", ASCENDING).to_list()
