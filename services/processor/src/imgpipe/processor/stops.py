"""Which requests no image may start for any more: cancelled or deleted ones.

Every processor process checks before each download. The process that handles the
cancel knows at once; the others learn it from the request's record, read at most
once per `ttl` per request, so a stopped request costs them little and no image of
it starts more than `ttl` after the stop is stored.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from imgpipe.processor.adapters.repository import ProcessorRepository, Stop

TTL = 1.0
# Past this many remembered requests, the stale ones are forgotten.
PRUNE_AT = 1_000


class Stops:
    def __init__(
        self,
        repository: ProcessorRepository,
        ttl: float = TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._repository = repository
        self._ttl = ttl
        self._clock = clock
        self._known: dict[str, tuple[Stop | None, float]] = {}

    def note(self, request_id: str, request: Mapping[str, Any] | None) -> Stop | None:
        """Remember what a freshly read request record says; returns its stop, if any."""
        reason = stop_of(request)
        if len(self._known) >= PRUNE_AT:
            self._prune()
        self._known[request_id] = (reason, self._clock())
        return reason

    async def reason(self, request_id: str) -> Stop | None:
        """ "cancelled" or "deleted" when the request is stopped, else None."""
        known = self._known.get(request_id)
        if known is not None and (known[0] == "deleted" or self._clock() - known[1] < self._ttl):
            return known[0]
        return self.note(request_id, await self._repository.get_request(request_id))

    def _prune(self) -> None:
        now = self._clock()
        self._known = {
            key: value for key, value in self._known.items() if now - value[1] < self._ttl
        }


def stop_of(request: Mapping[str, Any] | None) -> Stop | None:
    if request is None:
        return None
    if request.get("deleted"):
        return "deleted"
    if request.get("cancelled"):
        return "cancelled"
    return None
