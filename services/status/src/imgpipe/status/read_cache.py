"""A read cache in front of the read model: rendered answers by request id.

Reading a 1,000-image request means its document and image pages from the database and
a render of about 150 KB of JSON: milliseconds of CPU that a client polling in a loop would pay
on every call. Here a request's answer is rendered once and served as bytes:

- an answer that is still changing (request in progress) is kept `ttl` seconds, so many
  clients polling the same request cost one database read per `ttl` per instance;
- a write this instance makes drops the answers it changes (`invalidate`), so what it
  wrote shows at once: the request appearing, its progress, its final state. Writes by
  other status instances show within `ttl` plus one read;
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
from dataclasses import dataclass

from imgpipe.status.adapters.repository import StatusRepository
from imgpipe.status.config import ReadCacheConfig
from imgpipe.status.views import Rendered, is_visible, render

Load = Callable[[str], Awaitable[Rendered | None]]
Clock = Callable[[], float]


@dataclass(frozen=True)
class _Entry:
    rendered: Rendered
    expires: float


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

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, request_id: str) -> Rendered | None:
        """The answer for `request_id`, or None for an unknown (or not yet visible) id."""
        entry = self._entries.get(request_id)
        if entry is not None:
            if self._clock() < entry.expires:
                self._entries.move_to_end(request_id)
                return entry.rendered
            self._drop(request_id)
        task = self._inflight.get(request_id)
        if task is None:
            task = asyncio.create_task(self._fill(request_id))
            self._inflight[request_id] = task
            task.add_done_callback(_retrieve)
        # Shielded: one client going away must not cancel the read the others wait for.
        return await asyncio.shield(task)

    def invalidate(self, request_ids: Iterable[str]) -> None:
        """Forget the answers for `request_ids`: their documents were just written."""
        for request_id in request_ids:
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
            if rendered is not None and self._inflight.get(request_id) is this:
                self._put(request_id, rendered, started)
            return rendered
        finally:
            if self._inflight.get(request_id) is this:
                del self._inflight[request_id]

    def _put(self, request_id: str, rendered: Rendered, started: float) -> None:
        ttl = self._config.final_ttl if rendered.settled else self._config.ttl
        if ttl <= 0 or rendered.nbytes > self._config.max_bytes:
            return
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
    """What a miss costs: the request's document and its image pages (two finds sent
    together), rendered if visible."""

    async def load(request_id: str) -> Rendered | None:
        doc = await repository.get(request_id)
        return render(doc) if doc is not None and is_visible(doc) else None

    return load
