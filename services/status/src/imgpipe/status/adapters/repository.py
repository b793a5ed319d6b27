"""The read model in MongoDB: a request's own document, and its image outcomes in pages.

- `requests`, `_id` = request id: what RequestReceived and RequestCompleted carry (rows,
  total, created_at, final status and counts, completed_at), `phase` (handlers.PHASES)
  and `updated_at`, the time of the latest event that changed it. Written about three
  times: received, first outcome (phase), completed. Also, per retry round N: its start
  (`retries.r<N>`), its end (`finals.r<N>`), and a cancel (`cancelled.r<N>`), see
  `handlers.py`.
- `image_pages`, `_id` = "<request id>:<page>": `ROWS_PER_PAGE` rows of the request
  (`rows`, from RequestReceived) and their outcomes under `images.<key>` (round 0) and
  `rounds.r<N>.<key>` (retry N), with `request_id` and `updated_at`. A page of products
  reads the request document and the pages of its rows, nothing else. Request
  documents written before rows moved to pages hold them under `rows` (they have no
  `rows_in_pages`); the reads take them from there.
- `deleted`, `_id` = request id: `{deleted: True, deleted_at}` and nothing else, a
  tombstone per deleted request. RequestDeleted deletes the request's document and
  pages; a later event of it (an image that was still in flight, a redelivery) would
  upsert them again, so a batch first drops the changes of ids known to be deleted:
  those this process deleted lately (in memory), and those the collection names (one
  find by `_id` per batch). Another instance deleting the request while this one writes
  may still leave a page behind: without the request document it is never shown.

Outcomes used to go into the request document, but the database rewrites (and diffs, for
its oplog) a whole document on every update, so each outcome cost more the larger the
request (SecantusDB: ~0.4 ms of CPU per image at 1,000 images). A page stays small
whatever the request's size. Documents written before pages existed hold outcomes under
`images` themselves; `get` merges those with the pages.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pymongo import DESCENDING, UpdateOne
from pymongo.asynchronous.database import AsyncDatabase

from imgpipe.contracts.mongo import Once
from imgpipe.contracts.recent import RecentIds
from imgpipe.status.handlers import ROWS_PER_PAGE, Change

REQUESTS = "requests"
IMAGE_PAGES = "image_pages"
DELETED = "deleted"
KNOWN_DELETED = 4096  # deleted ids remembered in memory, not looked up again
OUTCOME_BATCH = 100  # image pages a round trip when a large request's outcomes are counted
# The list's two orders, newest first (the _id breaks ties of one millisecond). Named, so
# that the list can hint them: each page is then a walk of a range of the index, on
# MongoDB and on SecantusDB (whose planner picks an index only for exact filters).
BY_CREATED = "list_by_created"
BY_PHASE = "list_by_phase"
LIST_ORDER = [("created_at", DESCENDING), ("_id", DESCENDING)]
# The list never shows the rows; a request's rows may be megabytes.
LIST_PROJECTION = {"rows": 0}


@dataclass(frozen=True)
class Position:
    """Where a page of the list ends: the last request's creation time and id."""

    created_at: datetime
    request_id: str


class StatusRepository:
    def __init__(self, database: AsyncDatabase) -> None:
        self.requests = database[REQUESTS]
        self.pages = database[IMAGE_PAGES]
        self.deleted = database[DELETED]
        self._known_deleted = RecentIds(KNOWN_DELETED)
        # Pages by request, once, before this process writes a page: the Runtime tries
        # it from start, `write` before its first page write. The read filters on
        # `request_id` alone, as the index does (SecantusDB uses an index only when the
        # filter's fields are exactly its fields).
        self.ensure_indexes = Once(self._create_indexes)

    async def _create_indexes(self) -> None:
        await self.pages.create_index("request_id")
        await self.requests.create_index(LIST_ORDER, name=BY_CREATED)
        await self.requests.create_index([("phase", DESCENDING), *LIST_ORDER], name=BY_PHASE)

    async def get_request(self, request_id: str) -> dict[str, Any] | None:
        """The request's own document alone (no outcomes, rows only in the old layout)."""
        return await self.requests.find_one({"_id": request_id})

    async def with_outcomes(self, doc: dict[str, Any], rows: int | None = None) -> dict[str, Any]:
        """The request's document (as `get_request` read it) with its outcomes, as `get`
        gives it: of every page, or with `rows` of the pages of its first `rows` rows
        only (one find by _id)."""
        request_id = doc["_id"]
        if rows is None:
            query: dict[str, Any] = {"request_id": request_id}
        else:
            last = (max(rows, 1) - 1) // ROWS_PER_PAGE
            query = {"_id": {"$in": [page_id(request_id, page) for page in range(last + 1)]}}
        pages = await self.pages.find(query).to_list(None)
        return assemble(request_id, doc, pages) or doc

    async def get(self, request_id: str) -> dict[str, Any] | None:
        """The request's document with every known outcome under `images`, or None.

        Two finds, sent together: the request document by _id, its pages by index.
        """
        doc, pages = await asyncio.gather(
            self.requests.find_one({"_id": request_id}),
            self.pages.find({"request_id": request_id}).to_list(None),
        )
        return assemble(request_id, doc, pages)

    async def outcome_pages(self, request_id: str) -> AsyncIterator[dict[str, Any]]:
        """The request's image pages without their rows (`images`, `rounds`), in no
        order, fetched a few at a time: for counting outcomes, never all held at once."""
        cursor = self.pages.find(
            {"request_id": request_id}, {"images": 1, "rounds": 1}, batch_size=OUTCOME_BATCH
        )
        async for page in cursor:
            yield page

    async def rows_page(
        self, request_id: str, start: int, count: int
    ) -> tuple[list[dict[str, Any]], dict[str, Any]] | None:
        """Rows `start` to `start + count` and a document with their outcomes (under
        `images`, as `get` gives them), or None for an unknown request.

        Only what the page needs, two finds sent together: the request document (its
        rows, in the layout before pages held them, sliced by the database) and the
        image pages of those rows, by _id. The request document keeps its other fields
        (retries, rounds), which decide what shows."""
        first, last = start // ROWS_PER_PAGE, (start + max(count, 1) - 1) // ROWS_PER_PAGE
        ids = [page_id(request_id, page) for page in range(first, last + 1)]
        doc, pages = await asyncio.gather(
            self.requests.find_one({"_id": request_id}, {"rows": {"$slice": [start, count]}}),
            self.pages.find({"_id": {"$in": ids}}).to_list(None),
        )
        if doc is None:
            return None
        rows = doc.pop("rows", None) or []
        if doc.get("rows_in_pages"):
            offset = start - first * ROWS_PER_PAGE
            rows = rows_of_pages(pages)[offset : offset + count]
        return rows, assemble(request_id, doc, pages) or doc

    async def write(self, changes: list[Change]) -> None:
        """At most one round trip per collection for a batch, one update per document.

        Changes only `$set` distinct paths and `$max` one time, so merging a burst for one
        document into a single update, in delivery order, gives the same document as
        applying them one by one. Pages go first: a final status seldom shows before the
        outcomes that came with it (either order converges).

        Changes of deleted requests are dropped: of those deleted in this batch, and of
        those deleted before (`deleted_among`, one find unless all are known).
        """
        deletions = {change.request_id: change.at for change in changes if change.delete}
        gone = await self.deleted_among({change.request_id for change in changes}) | set(deletions)
        if deletions:
            await self.delete(deletions)
        requests, pages = merge([change for change in changes if change.request_id not in gone])
        await self.ensure_indexes()
        if pages:
            await self.pages.bulk_write(pages, ordered=True)
        if requests:
            await self.requests.bulk_write(requests, ordered=True)

    async def deleted_among(self, request_ids: set[str]) -> set[str]:
        """Which of `request_ids` were deleted (have a tombstone)."""
        known = {request_id for request_id in request_ids if request_id in self._known_deleted}
        unknown = sorted(request_ids - known)
        if not unknown:
            return known
        found = await self.deleted.find({"_id": {"$in": unknown}}, {"_id": 1}).to_list(None)
        for doc in found:
            self._known_deleted.add(doc["_id"])
        return known | {doc["_id"] for doc in found}

    async def delete(self, deletions: dict[str, datetime]) -> None:
        """Tombstones first (from then on other instances skip the ids' events too), then
        the request documents and their pages. Each step is idempotent: a redelivered
        RequestDeleted finishes what a crash interrupted."""
        await self.deleted.bulk_write(
            [
                UpdateOne(
                    {"_id": request_id},
                    {"$setOnInsert": {"deleted": True, "deleted_at": at}},
                    upsert=True,
                )
                for request_id, at in deletions.items()
            ],
            ordered=False,
        )
        for request_id in deletions:
            self._known_deleted.add(request_id)
        ids = list(deletions)
        await asyncio.gather(
            self.requests.delete_many({"_id": {"$in": ids}}),
            self.pages.delete_many({"request_id": {"$in": ids}}),
        )

    async def list_requests(
        self,
        phase: str | None,
        before: Position | None,
        limit: int,
        counted: Callable[[dict[str, Any]], bool] = lambda _: False,
    ) -> list[dict[str, Any]]:
        """Up to `limit` visible requests, newest first, created before `before`, each as
        `get` would give it (with its outcomes only while it is not final and not
        `counted`: a final request's counts are in its own document, and a `counted`
        one's are in a tally there).

        Keyset paging: a page starts strictly after the previous page's last request, so
        requests that arrive meanwhile (newer) never shift a later page. Two ranges of
        the index, no `$or`: the rest of `before`'s millisecond, then everything older.
        """
        await self.ensure_indexes()
        scope: dict[str, Any] = {} if phase is None else {"phase": phase}
        if before is None:
            # Only requests whose RequestReceived arrived have a creation time.
            ranges = [{**scope, "created_at": {"$type": "date"}}]
        else:
            ranges = [
                {**scope, "created_at": before.created_at, "_id": {"$lt": before.request_id}},
                {**scope, "created_at": {"$lt": before.created_at}},
            ]
        docs: list[dict[str, Any]] = []
        for query in ranges:
            if len(docs) >= limit:
                break
            cursor = self.requests.find(
                query,
                LIST_PROJECTION,
                sort=LIST_ORDER,
                limit=limit - len(docs),
                hint=BY_CREATED if phase is None else BY_PHASE,
            )
            docs += await cursor.to_list(None)
        return list(await asyncio.gather(*(self._with_outcomes(doc, counted) for doc in docs)))

    async def _with_outcomes(
        self, doc: dict[str, Any], counted: Callable[[dict[str, Any]], bool]
    ) -> dict[str, Any]:
        if doc.get("product_count") is None:  # stored before the list existed
            rows = await self.requests.find_one({"_id": doc["_id"]}, {"rows": 1})
            doc["product_count"] = len((rows or {}).get("rows") or [])
        if doc.get("final_counts") and not (doc.get("retries") or doc.get("cancelled")):
            return doc  # final, never retried: its counts are in its own document
        if counted(doc):
            return doc
        cursor = self.pages.find({"request_id": doc["_id"]}, LIST_PROJECTION)
        return assemble(doc["_id"], doc, await cursor.to_list(None)) or doc


def page_id(request_id: str, page: int) -> str:
    return f"{request_id}:{page}"


def merge(changes: list[Change]) -> tuple[list[UpdateOne], list[UpdateOne]]:
    """(updates of request documents, updates of image pages), one per document touched.
    RequestReceived's rows go to their pages, which are written before the request
    document: whoever sees it `received` finds the rows."""
    fields: dict[tuple[str, int | None], dict[str, Any]] = {}
    latest: dict[tuple[str, int | None], datetime] = {}
    phases: dict[str, tuple[str, bool]] = {}  # request id -> (phase, reset in this batch)
    maxes: dict[str, dict[str, int]] = {}  # request id -> path -> highest value in the batch
    for change in changes:  # dicts keep first-seen order: documents stay in delivery order
        targets: list[tuple[str, int | None]] = [(change.request_id, change.page)]
        if change.phase is not None or change.maxes:  # the request document changes too
            targets.append((change.request_id, None))
        if change.phase is not None:
            phases[change.request_id] = _next_phase(phases.get(change.request_id), change)
        if change.maxes:
            raised = maxes.setdefault(change.request_id, {})
            for path, value in change.maxes.items():
                raised[path] = max(value, raised.get(path, value))
        fields.setdefault(targets[0], {}).update(change.fields)
        for number, rows in (change.row_pages or {}).items():
            fields.setdefault((change.request_id, number), {})["rows"] = rows
            targets.append((change.request_id, number))
        for target in targets:
            fields.setdefault(target, {})
            seen = latest.get(target)
            latest[target] = change.at if seen is None else max(seen, change.at)
    requests: list[UpdateOne] = []
    pages: list[UpdateOne] = []
    for (request_id, page), own in fields.items():
        at: dict[str, Any] = {"updated_at": latest[(request_id, page)]}
        if page is None:
            at |= maxes.get(request_id, {})
            update: dict[str, Any] = {"$max": at}
            if request_id in phases:
                phase, reset = phases[request_id]
                own, at = ({**own, "phase": phase}, at) if reset else (own, {**at, "phase": phase})
                update["$max"] = at
            if own:  # MongoDB refuses an empty $set
                update["$set"] = own
            requests.append(UpdateOne({"_id": request_id}, update, upsert=True))
        else:
            update = {"$set": own, "$setOnInsert": {"request_id": request_id}, "$max": at}
            pages.append(UpdateOne({"_id": page_id(request_id, page)}, update, upsert=True))
    return requests, pages


def rows_of_pages(pages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows the pages hold, in row order (pages come back in any order)."""
    ordered = sorted(pages, key=lambda page: int(str(page["_id"]).rsplit(":", 1)[1]))
    return [row for page in ordered for row in page.get("rows") or ()]


def _next_phase(known: tuple[str, bool] | None, change: Change) -> tuple[str, bool]:
    """The phase after `change`, in delivery order: a reset replaces it, anything else
    only moves it forward; and whether a reset happened in the batch ($set, not $max)."""
    assert change.phase is not None
    if change.phase_reset:
        return change.phase, True
    phase, reset = known or ("", False)
    return max(phase, change.phase), reset


def assemble(
    request_id: str, doc: dict[str, Any] | None, pages: list[dict[str, Any]]
) -> dict[str, Any] | None:
    """One document in the shape the views read: the request's fields, every outcome
    under `images`, `updated_at` the latest of them all. None if nothing is known.

    Without the request document (outcomes overtook RequestReceived) the result has no
    `received`, so the views keep the request hidden, as they did with one document.
    Retry rounds' outcomes are merged the same way, under `rounds.r<N>`, and the rows the
    pages hold (`rows_in_pages`) under `rows`, in order.
    """
    if doc is None and not pages:
        return None
    merged: dict[str, Any] = doc if doc is not None else {"_id": request_id}
    images: dict[str, Any] = dict(merged.get("images") or {})  # the previous layout's
    rounds: dict[str, dict[str, Any]] = {}
    times = [merged["updated_at"]] if merged.get("updated_at") else []
    for page in pages:
        images.update(page.get("images") or {})
        for name, outcomes in (page.get("rounds") or {}).items():
            rounds.setdefault(name, {}).update(outcomes)
        if page.get("updated_at"):
            times.append(page["updated_at"])
    if images:
        merged["images"] = images
    if merged.get("rows_in_pages"):
        merged["rows"] = rows_of_pages(pages)
    if rounds:
        merged["rounds"] = rounds
    if times:
        merged["updated_at"] = max(times)
    return merged
