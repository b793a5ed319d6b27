"""The notifier's own MongoDB database, one adapter per concept: what it learned about
requests (`requests`, `rows`, `images`), the subscriptions, and the delivery log."""

from __future__ import annotations

from pymongo.asynchronous.database import AsyncDatabase

from imgpipe.notifier.adapters.deliveries import Deliveries
from imgpipe.notifier.adapters.requests import Requests
from imgpipe.notifier.adapters.subscriptions import Subscriptions


class NotifierRepository:
    def __init__(self, db: AsyncDatabase) -> None:
        self.requests = Requests(db)
        self.subscriptions = Subscriptions(db)
        self.deliveries = Deliveries(db)

    async def ensure_indexes(self) -> None:
        await self.requests.ensure_indexes()
        await self.subscriptions.ensure_indexes()
        await self.deliveries.ensure_indexes()
