"""The processor's own database: one `requests` doc per request, one `images` doc per
image outcome, and in `images_history` the failed outcomes a retry replaced. For
incremental catalogues (docs/architecture.md, "Reusing outputs"): one `sources` doc per
input URL (what its host said of it last, and a hash of its bytes), and one `outputs`
doc per stored output shared by content and options, with the requests using it.

Round trips per image are counted (SecantusDB spends ~0.5 ms per round trip, ~0.1 ms
per inserted document and ~0.5 ms per updated one): a job reads its images in one
query by `_id` (`<request_id>:<image_key>`), and outcomes that finish together are
inserted in one bulk write, each request's counters moving once per batch. An image
doc is written only once its outcome is known, so recording is an insert: a duplicate
key means another delivery recorded that image first, and its outcome stands.

SecantusDB uses an index only when the filter's fields are exactly the index's, so
every per-image filter names the `_id` alone; and its findAndModify walks the whole
collection whatever the filter (40 ms at 2,000 outputs, against 1 ms for an update), so
the per-image writes on `outputs` are updates, followed by a read by `_id` when the
document is wanted.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pymongo import ASCENDING, ReplaceOne, ReturnDocument, UpdateOne
from pymongo.asynchronous.database import AsyncDatabase

from imgpipe.contracts.events import Options, utcnow
from imgpipe.contracts.mongo import followed_by_journaled, insert_new

Doc = dict[str, Any]


def image_id(request_id: str, image_key: str) -> str:
    return f"{request_id}:{image_key}"


@dataclass(frozen=True)
class Outcome:
    """One image's outcome to record: `fields` is all its doc holds but the `_id`.
    `primary`: the first place of its URL, whose bytes the request's tally counts (the
    URL's other places share its output)."""

    request_id: str
    image_key: str
    fields: Mapping[str, Any]
    primary: bool = True

    @property
    def image_id(self) -> str:
        return image_id(self.request_id, self.image_key)


Stop = Literal["cancelled", "deleted"]
# The request doc's counters beside `ok` and `failed`, as events.Tally names them.
TALLIED = ("stored", "bytes_in", "bytes_out", "not_modified", "same_bytes")


def _counted(outcome: Outcome) -> dict[str, int]:
    """What one outcome adds to its request's counters."""
    fields = outcome.fields
    if fields["outcome"] != "ok":
        return {"failed": 1}
    counted = {"ok": 1}
    if fields.get("reused"):
        counted[fields["reused"]] = 1
    if outcome.primary:
        counted |= {
            "stored": 1,
            "bytes_in": fields.get("bytes_in") or 0,
            "bytes_out": fields.get("bytes_out") or 0,
        }
    return counted


def tally_of(request: Mapping[str, Any]) -> dict[str, int]:
    """The request doc's counters as events.Tally's fields (0 for a doc older than them)."""
    return {name: int(request.get(name) or 0) for name in ("ok", "failed", *TALLIED)}


class ProcessorRepository:
    def __init__(self, db: AsyncDatabase) -> None:
        self.requests = db["requests"]
        self.images = db["images"]
        self.history = db["images_history"]
        self.sources = db["sources"]
        self.outputs = db["outputs"]
        # The writes made on the way to an outcome: each batch of outcomes ends with the
        # journaled counter bump (count_batch) before its events leave, and a crash
        # before it redoes the work.
        self._early_images = followed_by_journaled(self.images)
        self._early_sources = followed_by_journaled(self.sources)
        self._early_outputs = followed_by_journaled(self.outputs)

    async def ensure_indexes(self) -> None:
        await self.images.create_index(
            [("request_id", ASCENDING), ("image_key", ASCENDING)], unique=True
        )
        # count_outcomes' filter, field for field: counting walks one request's entries.
        await self.images.create_index([("request_id", ASCENDING), ("outcome", ASCENDING)])
        await self.history.create_index("request_id")
        # outputs_of's filter: the shared outputs a request holds, on its deletion.
        await self.outputs.create_index("requests")

    # Requests ---------------------------------------------------------------------

    async def create_request(
        self,
        request_id: str,
        total: int,
        options: Options,
        traceparent: str | None = None,
        refresh: bool = False,
    ) -> Doc:
        """Create the request once; a redelivered RequestReceived gets the existing doc.
        `traceparent`: the request's trace, for its RequestCompleted; `refresh`: reuse no
        earlier output (its retries neither)."""
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
                    "refresh": refresh,
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

    async def add_counts(self, request_id: str, increments: Mapping[str, int]) -> Doc:
        """Bump the counters (`ok`, `failed` and the tally's others, see `TALLIED`) by a
        batch's outcomes; returns the request after the bump."""
        doc = await self.requests.find_one_and_update(
            {"_id": request_id},
            {"$inc": dict(increments)},
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

    async def stop(self, request_id: str, reason: Stop) -> Doc | None:
        """Flag the request cancelled or deleted (no image of it starts any more); the
        request after that, or None when it is unknown."""
        return await self.requests.find_one_and_update(
            {"_id": request_id},
            {"$set": {reason: True, f"{reason}_at": utcnow()}},
            return_document=ReturnDocument.AFTER,
        )

    async def open_round(self, request_id: str, round: int, retried: int) -> None:
        """Start retry round `round` of `retried` failed images: they no longer count as
        failed, and the request is running again."""
        await self.requests.update_one(
            {"_id": request_id},
            {
                "$set": {"round": round, "completed_published": False, "round_sent": False},
                "$inc": {"failed": -retried},
            },
        )

    async def mark_round_sent(self, request_id: str) -> None:
        await self.requests.update_one({"_id": request_id}, {"$set": {"round_sent": True}})

    async def leave_tombstone(self, request_id: str) -> None:
        """Replace the request by the least that keeps late messages of it from doing
        work: its id and when it was deleted."""
        await self.requests.replace_one(
            {"_id": request_id}, {"deleted": True, "deleted_at": utcnow()}, upsert=True
        )

    # Images -----------------------------------------------------------------------

    async def images_with_outcome(self, request_id: str, outcome: str) -> list[Doc]:
        return await self.images.find({"request_id": request_id, "outcome": outcome}).to_list()

    async def supersede(self, failed: Sequence[Doc], round: int) -> None:
        """Keep the failed outcomes a retry round replaces (once each, however often
        this runs)."""
        if not failed:
            return
        copies = [
            {**doc, "_id": f"{doc['_id']}:r{round}", "superseded_in": round} for doc in failed
        ]
        await insert_new(self.history, copies)

    async def superseded(self, request_id: str, round: int) -> list[Doc]:
        """The failed outcomes round `round` retries."""
        docs = await self.history.find({"request_id": request_id}).to_list()
        return [doc for doc in docs if doc["superseded_in"] == round]

    async def drop_superseded(self, request_id: str, image_keys: Sequence[str], round: int) -> None:
        """Remove the replaced outcomes from `images`, so the round's own can be recorded;
        outcomes the round already recorded stay."""
        ids = [image_id(request_id, key) for key in image_keys]
        await self.images.delete_many({"_id": {"$in": ids}, "round": {"$ne": round}})

    async def drop_images(self, request_id: str) -> None:
        """Every outcome of the request, current and replaced."""
        ids = [
            doc["_id"]
            for outcome in ("ok", "failed")
            for doc in await self.images.find(
                {"request_id": request_id, "outcome": outcome}, {"_id": 1}
            ).to_list()
        ]
        if ids:
            await self.images.delete_many({"_id": {"$in": ids}})
        await self.history.delete_many({"request_id": request_id})

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
        return await insert_new(self._early_images, docs)

    async def count_batch(self, outcomes: Sequence[Outcome]) -> dict[str, Doc]:
        """One counter bump per request for outcomes just recorded; request id -> request."""
        tally: dict[str, Counter[str]] = {}
        for o in outcomes:
            tally.setdefault(o.request_id, Counter({"ok": 0, "failed": 0})).update(_counted(o))
        return {
            request_id: await self.add_counts(request_id, counts)
            for request_id, counts in tally.items()
        }

    async def count_outcomes(self, request_id: str) -> tuple[int, int]:
        """(ok, failed) counted from the images themselves: the truth the counters track."""
        ok = await self.images.count_documents({"request_id": request_id, "outcome": "ok"})
        failed = await self.images.count_documents({"request_id": request_id, "outcome": "failed"})
        return ok, failed

    # Sources and shared outputs ---------------------------------------------------

    async def get_sources(self, source_ids: Sequence[str]) -> dict[str, Doc]:
        """What is remembered of these URLs (by source id), in one round trip."""
        docs = await self.sources.find({"_id": {"$in": list(source_ids)}}).to_list()
        return {doc["_id"]: doc for doc in docs}

    async def remember_sources(self, sources: Sequence[tuple[str, Mapping[str, Any]]]) -> None:
        """What the hosts said of these URLs' bytes last (source id, fields): a later
        request asks them again. One round trip."""
        now = utcnow()
        docs = [{"_id": sid, **fields, "seen_at": now} for sid, fields in sources]
        new = await insert_new(self._early_sources, docs)
        seen = [doc for doc, inserted in zip(docs, new, strict=True) if not inserted]
        if seen:
            await self._early_sources.bulk_write(
                [ReplaceOne({"_id": doc["_id"]}, doc, upsert=True) for doc in seen], ordered=False
            )

    async def get_outputs(self, keys: Sequence[str]) -> dict[str, Doc]:
        """The outputs among `keys`, by key, whatever their state."""
        docs = await self.outputs.find({"_id": {"$in": list(keys)}}).to_list()
        return {doc["_id"]: doc for doc in docs}

    async def create_outputs(self, joins: Sequence[tuple[str, str]]) -> list[bool]:
        """Create each output (request id, key) that has no doc yet, with the request as
        its one user, in one round trip; for each, True if this call created it (then
        the join holds: a new output is not being deleted). The others exist: join them
        with `join_outputs`."""
        now = utcnow()
        docs = [
            {"_id": key, "requests": [request_id], "created_at": now} for request_id, key in joins
        ]
        return await insert_new(self._early_outputs, docs)

    async def join_outputs(self, joins: Sequence[tuple[str, str, bool]]) -> None:
        """Add each (request id, key, create) request to the output's users, creating the
        output's doc when `create` (a request about to write its file) and it has none,
        in one round trip. Filters name the `_id` alone: reuse.SharedOutputs reads the
        outputs back to learn which joins hold."""
        now = utcnow()
        await self._early_outputs.bulk_write(
            [
                UpdateOne(
                    {"_id": key},
                    {"$addToSet": {"requests": request_id}}
                    | ({"$setOnInsert": {"created_at": now}} if create else {}),
                    upsert=create,
                )
                for request_id, key, create in joins
            ],
            ordered=False,
        )

    async def get_output(self, key: str) -> Doc | None:
        return await self.outputs.find_one({"_id": key})

    async def outputs_stored(self, outputs: Sequence[tuple[str, Mapping[str, Any]]]) -> None:
        """These outputs' files are written (key, fields): they may be reused from now on.
        One round trip."""
        await self._early_outputs.bulk_write(
            [
                UpdateOne({"_id": key}, {"$set": {**fields, "stored": True}})
                for key, fields in outputs
            ],
            ordered=False,
        )

    async def outputs_of(self, request_id: str) -> list[str]:
        """Keys of the shared outputs the request uses: those its image records name, and
        those it reserved without recording an outcome (a crash, a delete meanwhile)."""
        keys = {
            doc["output_key"]
            for doc in await self.images.find(
                {"request_id": request_id, "outcome": "ok"}, {"output_key": 1}
            ).to_list()
            if doc.get("output_key")
        }
        held = await self.outputs.find({"requests": request_id}, {"_id": 1}).to_list()
        return sorted(keys | {doc["_id"] for doc in held})

    async def release_output(self, key: str, request_id: str) -> Doc | None:
        """Take the request off the output's users. When none is left, mark the output
        as being deleted (no claim or reservation succeeds from then on) and return it:
        the caller deletes its file, then `forget_output`. A marked output found again
        (a crash before the file went) is returned again."""
        await self.outputs.update_one({"_id": key}, {"$pull": {"requests": request_id}})
        output = await self.get_output(key)
        if output is None or output.get("deleting"):
            # Marked already (a delete that crashed midway): requests that joined it since
            # failed their claims, and the deletion goes on.
            return output
        marked = await self.outputs.update_one(
            {"_id": key, "requests": {"$size": 0}}, {"$set": {"deleting": True}}
        )
        return await self.get_output(key) if marked.matched_count else None

    async def forget_output(self, key: str) -> None:
        await self.outputs.delete_one({"_id": key, "deleting": True})
