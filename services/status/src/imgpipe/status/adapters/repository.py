"""The read model in MongoDB: a request's own document, and its image outcomes in pages.

- `requests`, `_id` = request id: what RequestReceived and RequestCompleted carry (rows,
  total, created_at, final status and counts, completed_at). Written about twice.
- `image_pages`, `_id` = "<request id>:<page>": the outcomes of `ROWS_PER_PAGE` rows
  under `images.<key>`, with `request_id` and `updated_at`.

Outcomes used to go into the request document, but the database rewrites (and diffs, for
its oplog) a whole document on every update, so each outcome cost more the larger the
request (SecantusDB: ~0.4 ms of CPU per image at 1,000 images). A page stays small
whatever the request's size. Documents written before pages existed hold outcomes under
`images` themselves; `get` merges those with the pages.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

from pymongo import UpdateOne
from pymongo.asynchronous.database import AsyncDatabase

from imgpipe.contracts.mongo import Once
from imgpipe.status.handlers import Change

REQUESTS = "requests"
IMAGE_PAGES = "image_pages"


class StatusRepository:
    def __init__(self, database: AsyncDatabase) -> None:
        self.requests = database[REQUESTS]
        self.pages = database[IMAGE_PAGES]
        # Pages by request, once, before this process writes a page: the Runtime tries
        # it from start, `write` before its first page write. The read filters on
        # `request_id` alone, as the index does (SecantusDB uses an index only when the
        # filter's fields are exactly its fields).
        self.ensure_indexes = Once(lambda: self.pages.create_index("request_id"))

    async def get(self, request_id: str) -> dict[str, Any] | None:
        """The request's document with every known outcome under `images`, or None.

        Two finds, sent together: the request document by _id, its pages by index.
        """
        doc, pages = await asyncio.gather(
            self.requests.find_one({"_id": request_id}),
            self.pages.find({"request_id": request_id}).to_list(None),
        )
        return assemble(request_id, doc, pages)

    async def write(self, changes: list[Change]) -> None:
        """At most one round trip per collection for a batch, one update per document.

        Changes only `$set` distinct paths and `$max` one time, so merging a burst for one
        document into a single update, in delivery order, gives the same document as
        applying them one by one. Pages go first: a final status seldom shows before the
        outcomes that came with it (either order converges).
        """
        requests, pages = merge(changes)
        if pages:
            await self.ensure_indexes()
            await self.pages.bulk_write(pages, ordered=True)
        if requests:
            await self.requests.bulk_write(requests, ordered=True)


def page_id(request_id: str, page: int) -> str:
    return f"{request_id}:{page}"


def merge(changes: list[Change]) -> tuple[list[UpdateOne], list[UpdateOne]]:
    """(updates of request documents, updates of image pages), one per document touched."""
    fields: dict[tuple[str, int | None], dict[str, Any]] = {}
    latest: dict[tuple[str, int | None], datetime] = {}
    for change in changes:  # dicts keep first-seen order: documents stay in delivery order
        target = (change.request_id, change.page)
        fields.setdefault(target, {}).update(change.fields)
        seen = latest.get(target)
        latest[target] = change.at if seen is None else max(seen, change.at)
    requests: list[UpdateOne] = []
    pages: list[UpdateOne] = []
    for (request_id, page), own in fields.items():
        at = {"updated_at": latest[(request_id, page)]}
        if page is None:
            requests.append(UpdateOne({"_id": request_id}, {"$set": own, "$max": at}, upsert=True))
        else:
            update = {"$set": own, "$setOnInsert": {"request_id": request_id}, "$max": at}
            pages.append(UpdateOne({"_id": page_id(request_id, page)}, update, upsert=True))
    return requests, pages


def assemble(
    request_id: str, doc: dict[str, Any] | None, pages: list[dict[str, Any]]
) -> dict[str, Any] | None:
    """One document in the shape the views read: the request's fields, every outcome
    under `images`, `updated_at` the latest of them all. None if nothing is known.

    Without the request document (outcomes overtook RequestReceived) the result has no
    `received`, so the views keep the request hidden, as they did with one document.
    """
    if doc is None and not pages:
        return None
    merged: dict[str, Any] = doc if doc is not None else {"_id": request_id}
    images: dict[str, Any] = dict(merged.get("images") or {})  # the previous layout's
    times = [merged["updated_at"]] if merged.get("updated_at") else []
    for page in pages:
        images.update(page.get("images") or {})
        if page.get("updated_at"):
            times.append(page["updated_at"])
    if images:
        merged["images"] = images
    if times:
        merged["updated_at"] = max(times)
    return merged
