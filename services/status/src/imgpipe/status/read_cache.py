"""A read cache in front of the read model: rendered answers by request id.

Reading a 1,000-image request means its document and image pages from the database and
a render of about 150 KB of JSON: milliseconds of CPU that a client polling in a loop would pay
on every call. Here a request's answer is rendered once and served as bytes:

- an answer that is still changing (request in progress) is kept `ttl` seconds, so many
  clients polling the same request cost one database read per `ttl` per instance;
- a write this instance makes drops the answers it changes (`invalidate`), so a status
  change it wrote shows at once: the request appearing, processing, its final state.
  Progress alone (more outcomes) marks the answer stale instead; writes by other status
  instances show within `ttl` plus one read;
- a stale or expired answer of a request in progress is served while one fresh read
  runs in the background (stale-while-revalidate, RFC 5861), for at most `stale`
  seconds past its time: under a busy database a poll never waits for the read its
  own progress caused, and the progress it shows is at most one read behind;
- a request whose read is slow (a large one: its outcomes are read whole for the counts)
  is kept at least its read time / `read_share`, and only a status change (an urgent
  write: received, first outcome, final, retry, deletion) drops it early: its progress
  may lag by that much, and polling it costs at most that share of the instance;
- a settled answer (final status, every image's outcome known) no longer changes; it is
  kept `final_ttl` seconds or until evicted;
- concurrent misses for the same id share one read (single flight);
- memory is bounded by `max_bytes`, least recently used first out;
- unknown ids (404) are not kept: the next read looks again.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

from imgpipe.contracts.recent import RecentIds
from imgpipe.status.adapters.repository import StatusRepository
from imgpipe.status.config import ReadCacheConfig
from imgpipe.status.views import (
    DEFAULT_LIMIT,
    Counted,
    OutcomeCount,
    Rendered,
    is_large,
    is_visible,
    render,
    running_tally,
    shown_images,
    tallied,
)

Load = Callable[[str], Awaitable[Rendered | None]]
SLOW_REQUESTS = 1024  # requests remembered as slow to read (the large ones being polled)
Clock = Callable[[], float]


@dataclass(frozen=True)
class _Entry:
    rendered: Rendered
    expires: float
    stale: bool = False  # its request changed since it was read (progress only)


class ReadCache:
    def __init__(
        self, load: Load, config: ReadCacheConfig | None = None, clock: Clock = time.monotonic
    ) -> None:
        self._load = load
        self._config = config or ReadCacheConfig()
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._bytes = 0
        self._inflight: dict[str, asyncio.Task[Rendered | None]] = {}
        self._slow = RecentIds(SLOW_REQUESTS)  # requests whose last read was slow

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, request_id: str) -> Rendered | None:
        """The answer for `request_id`, or None for an unknown (or not yet visible) id."""
        entry = self._entries.get(request_id)
        if entry is not None:
            now = self._clock()
            if not entry.stale and now < entry.expires:
                self._entries.move_to_end(request_id)
                return entry.rendered
            if not entry.rendered.settled and now < entry.expires + self._config.stale:
                self._read(request_id)  # in the background: this poll does not wait
                self._entries.move_to_end(request_id)
                return entry.rendered
            self._drop(request_id)
        # Shielded: one client going away must not cancel the read the others wait for.
        return await asyncio.shield(self._read(request_id))

    def _read(self, request_id: str) -> asyncio.Task[Rendered | None]:
        """The read of `request_id` in flight, started if there is none."""
        task = self._inflight.get(request_id)
        if task is None:
            task = asyncio.create_task(self._fill(request_id))
            self._inflight[request_id] = task
            task.add_done_callback(_retrieve)
        return task

    def invalidate(self, request_ids: Iterable[str], urgent: Iterable[str] | None = None) -> None:
        """Forget the answers for `request_ids`: their documents were just written.
        `urgent`: those whose status changed (None: all of them); a slow answer is kept
        through other writes (its progress) until it expires."""
        changed = None if urgent is None else set(urgent)
        for request_id in request_ids:
            progress_only = changed is not None and request_id not in changed
            if progress_only and request_id in self._slow:
                continue  # its answer, or the read in flight, may lag: by design
            entry = self._entries.get(request_id)
            if progress_only and entry is not None:
                self._entries[request_id] = replace(entry, stale=True)
            else:
                self._drop(request_id)
            # A read in flight may predate the write: it is neither kept nor joined.
            self._inflight.pop(request_id, None)

    async def _fill(self, request_id: str) -> Rendered | None:
        # The clock starts before the read: an event stored while it runs is seen
        # no later than `ttl` after the read began.
        started = self._clock()
        this = asyncio.current_task()
        try:
            rendered = await self._load(request_id)
        except BaseException:
            if self._inflight.get(request_id) is this:
                self._drop(request_id)  # the next poll waits, and hears why
            raise
        else:
            if self._inflight.get(request_id) is this:
                if rendered is None:
                    self._drop(request_id)  # deleted: a stale answer must not outlive it
                else:
                    self._put(request_id, rendered, started, self._clock() - started)
            return rendered
        finally:
            if self._inflight.get(request_id) is this:
                del self._inflight[request_id]

    def _put(self, request_id: str, rendered: Rendered, started: float, took: float) -> None:
        ttl = self._config.final_ttl if rendered.settled else self._config.ttl
        if ttl <= 0 or rendered.nbytes > self._config.max_bytes:
            return
        slow = not rendered.settled and took / self._config.read_share > ttl
        if slow:
            ttl = took / self._config.read_share
            self._slow.add(request_id)
        self._drop(request_id)
        self._entries[request_id] = _Entry(rendered, started + ttl)
        self._bytes += rendered.nbytes
        while self._bytes > self._config.max_bytes:
            oldest = next(iter(self._entries))
            self._drop(oldest)

    def _drop(self, request_id: str) -> None:
        entry = self._entries.pop(request_id, None)
        if entry is not None:
            self._bytes -= entry.rendered.nbytes


def _retrieve(task: asyncio.Task[Rendered | None]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: every waiter may have gone away meanwhile


def reader(repository: StatusRepository) -> Load:
    """What a miss costs: the request's document, then its outcomes, rendered if visible.

    A request of up to a page of products reads all its image pages. A larger one
    (`is_large`) reads the pages of its first page of products, and takes its totals
    from the processor's tally while it runs (`running_tally`); otherwise it counts its
    outcomes a page at a time, never holding them all."""

    async def load(request_id: str) -> Rendered | None:
        head = await repository.get_request(request_id)
        if head is None or not is_visible(head):
            return None  # outcomes alone (they overtook RequestReceived) are not shown
        if not is_large(head):
            return render(await repository.with_outcomes(head))
        tally = running_tally(head)
        counted = tallied(tally) if tally is not None else await _count(repository, head)
        return render(await repository.with_outcomes(head, rows=DEFAULT_LIMIT), counted)

    return load


async def _count(repository: StatusRepository, head: dict[str, Any]) -> Counted:
    """Every shown outcome of the request counted, a page of them at a time."""
    count = OutcomeCount()
    async for page in repository.outcome_pages(head["_id"]):
        # A page's outcomes as the request's document would show them: its retries
        # decide which round's outcome of an image shows.
        count.add(shown_images({**page, "retries": head.get("retries")}).values())
    return count.counted()
