"""Incremental catalogues: an image whose host says it has not changed, or whose bytes
were encoded before with the same options, reuses the output stored then
(docs/architecture.md, "Reusing outputs").

- A URL's `sources` record keeps the validators its host sent (ETag, Last-Modified) and
  a SHA-256 of the bytes. The next download of the URL is conditional; a 304 means the
  bytes are those hashed, and their output for the request's options is reused without
  downloading or decoding anything. Nothing is reused without asking the host.
- An output is named by its input's hash and the options (`output_key`), so the same
  picture under two URLs, or from a host without validators, is encoded once.
- Each output records the requests using it (`$addToSet` when one starts to,
  `$pull` when one is deleted); its file goes when the set is empty. A request about to
  write an output joins the set first, so no deletion takes a file being written.
- Reusing an output (a claim) or about to write one (a reservation), a request joins
  its users, then reads it back. The join holds when the output is not being deleted
  and names the request (and, for a claim, is stored): a deletion marks an output only
  while its set is empty, so either the mark came first (and the read sees it) or the
  request is in the set (and the mark never comes). Joins that arrive together go in
  one write and one read (SecantusDB's conditional updates cost a scan each). A join
  that does not hold may leave the request among the users of an output it does not
  use: harmless, it lets go of it when it is deleted.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from imgpipe.contracts.batching import Batcher
from imgpipe.contracts.events import Options
from imgpipe.contracts.recent import RecentIds
from imgpipe.processor.adapters.download import Validators
from imgpipe.processor.adapters.repository import Doc, ProcessorRepository
from imgpipe.processor.adapters.storage import Storage

# Seconds a batch of joins or records waits for others. None of them holds a codec
# worker or a download; a join waits after the encode, before the file is written:
# at 0.02 s a batch of joins held about 2, at 0.1 s about 5, which saved 0.6 to 2 ms
# of CPU per image outside the codec (README, "Against the reference").
WINDOW = 0.1
RECENT_MEMBERS = 10_000  # (request, output) pairs remembered as joined


def source_id(url: str) -> str:
    """The `sources` record's id: a hash, so that a long URL makes a short key."""
    return hashlib.sha256(url.encode()).hexdigest()


def output_key(input_sha256: str, options: Options) -> str:
    """The name of the output of these input bytes under these options: what the codec
    reads, and nothing else (not `refresh`, not the request)."""
    encoding = json.dumps(options.model_dump(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{input_sha256}\n{encoding}".encode()).hexdigest()


@dataclass(frozen=True)
class Known:
    """What an earlier download of a URL left: the host's validators, the size of its
    bytes, and the stored output of those bytes under this job's options."""

    validators: Validators
    size: int
    output_key: str


def source_fields(url: str, validators: Validators, sha256: str, size: int) -> dict[str, Any]:
    return {
        "url": url,
        "etag": validators.etag,
        "last_modified": validators.last_modified,
        "sha256": sha256,
        "size": size,
    }


@dataclass
class SharedOutputs:
    """Looks up what may be reused, and lets go of outputs no request uses any more."""

    repository: ProcessorRepository
    storage: Storage
    # One encode per output key at a time in this process: two URLs of the same bytes
    # in one job are encoded once, the second reusing the first's output.
    _locks: dict[str, tuple[asyncio.Lock, int]] = field(default_factory=dict, init=False)
    _joins: Batcher[tuple[str, str, bool], Doc | None] = field(init=False)
    _sources: Batcher[tuple[str, Mapping[str, Any]], None] = field(init=False)
    _stored: Batcher[tuple[str, Mapping[str, Any]], None] = field(init=False)
    # (request, output) pairs whose join held lately: a hint of who is a user already.
    _members: RecentIds = field(default_factory=lambda: RecentIds(RECENT_MEMBERS), init=False)

    def __post_init__(self) -> None:
        # Writes that arrive within the window, or while a batch is written, go
        # together: a round trip costs ~0.5 ms of the processor's CPU and as much of
        # SecantusDB's on top of each document's work.
        self._joins = Batcher(self._join_batch, window=WINDOW, name="output-joins")
        self._sources = Batcher(self._source_batch, window=WINDOW, name="source-records")
        self._stored = Batcher(self._stored_batch, window=WINDOW, name="output-records")

    async def remember(self, url: str, fields: Mapping[str, Any]) -> None:
        """What the host said of the URL's bytes, for the next request of it."""
        await self._sources.submit((source_id(url), fields))

    async def stored(self, key: str, fields: Mapping[str, Any], reserved: Doc) -> None:
        """The output's file is written: it may be reused from now on. `reserved` is the
        output as its reservation found it: stored with these very fields already (the
        same bytes encoded again, as a refresh does), there is nothing to write."""
        if reserved.get("stored") and all(reserved.get(k) == v for k, v in fields.items()):
            return
        await self._stored.submit((key, fields))

    async def _source_batch(self, sources: list[tuple[str, Mapping[str, Any]]]) -> list[None]:
        await self.repository.remember_sources(sources)
        return [None] * len(sources)

    async def _stored_batch(self, outputs: list[tuple[str, Mapping[str, Any]]]) -> list[None]:
        await self.repository.outputs_stored(outputs)
        return [None] * len(outputs)

    async def claim(self, request_id: str, key: str) -> Doc | None:
        """The stored output named `key`, now with the request among its users; None
        when there is none or it is being deleted."""
        output = await self._joins.submit((request_id, key, False))
        return output if output is not None and output.get("stored") else None

    async def reserve(self, request_id: str, key: str) -> Doc | None:
        """Make the request a user of the output named `key` before it writes the file,
        so that no deletion takes the file from under it; returns the output as the join
        found it, or None while it is being deleted (then the request writes a file of
        its own)."""
        return await self._joins.submit((request_id, key, True))

    async def _join_batch(self, joins: list[tuple[str, str, bool]]) -> list[Doc | None]:
        # A reservation usually names a new output: its insert is the join, and holds.
        reservations = [(request_id, key) for request_id, key, create in joins if create]
        created = await self.repository.create_outputs(reservations)
        new = {join for join, made in zip(reservations, created, strict=True) if made}
        rest = [join for join in joins if join[:2] not in new]
        outputs = await self._join_existing(rest) if rest else {}
        results = [
            {"_id": key, "requests": [request_id]}
            if (request_id, key) in new
            else _joined(outputs.get(key), request_id)
            for request_id, key, _ in joins
        ]
        for (request_id, key, _), result in zip(joins, results, strict=True):
            if result is not None:
                self._members.add(_member(request_id, key))
        return results

    async def _join_existing(self, joins: list[tuple[str, str, bool]]) -> dict[str, Doc]:
        """Join outputs that have a doc; returns the docs as read after the joins.

        A request that joined an output lately (the same bytes again, under another URL
        or re-encoded) is probably still among its users: those are read first, and
        only the joins the read does not show holding are written (SecantusDB spends
        ~0.2 ms on an update that changes nothing). A read showing the request among
        the users holds as a join does: no deletion marks an output with users."""
        likely = {key for request_id, key, _ in joins if _member(request_id, key) in self._members}
        outputs = await self.repository.get_outputs(sorted(likely)) if likely else {}
        needed = [join for join in joins if _joined(outputs.get(join[1]), join[0]) is None]
        if needed:
            await self.repository.join_outputs(needed)
            outputs |= await self.repository.get_outputs(sorted({key for _, key, _ in needed}))
        return outputs

    async def known(self, urls: Sequence[str], options: Options) -> dict[str, Known]:
        """The URLs worth a conditional GET: validators remembered and an output of their
        bytes under `options` stored (without one, a 304 would leave nothing to reuse).
        Two round trips for a whole job."""
        ids = {url: source_id(url) for url in urls}
        sources = await self.repository.get_sources(list(ids.values()))
        keys = {
            url: output_key(doc["sha256"], options)
            for url, sid in ids.items()
            if (doc := sources.get(sid)) is not None and _validators(doc)
        }
        found = await self.repository.get_outputs(list(keys.values())) if keys else {}
        stored = {key: doc for key, doc in found.items() if _usable(doc)}
        return {
            url: Known(_validators(sources[ids[url]]), int(sources[ids[url]]["size"]), key)
            for url, key in keys.items()
            if key in stored
        }

    @asynccontextmanager
    async def encoding(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            users = self._locks[key][1] - 1  # forgotten with its last user: memory stays flat
            if users:
                self._locks[key] = (lock, users)
            else:
                del self._locks[key]

    async def release(self, request_id: str, keys: Sequence[str]) -> int:
        """Take the request off these outputs; delete those no request uses any more.
        Safe to repeat: an output marked for deletion is found again until it is gone.
        Returns how many were deleted."""
        deleted = 0
        for key in keys:
            doc = await self.repository.release_output(key, request_id)
            if doc is None:
                continue  # other requests still use it
            if doc.get("location"):
                await self.storage.delete_shared(doc["location"])
            await self.repository.forget_output(key)
            deleted += 1
        return deleted


def _member(request_id: str, key: str) -> str:
    return f"{request_id} {key}"


def _usable(output: Mapping[str, Any]) -> bool:
    return bool(output.get("stored")) and not output.get("deleting")


def _joined(output: Doc | None, request_id: str) -> Doc | None:
    """The output when the request's join holds: not being deleted, and names it."""
    if output is None or output.get("deleting") or request_id not in output.get("requests", ()):
        return None
    return output


def _validators(source: Mapping[str, Any]) -> Validators:
    return Validators(source.get("etag"), source.get("last_modified"))
