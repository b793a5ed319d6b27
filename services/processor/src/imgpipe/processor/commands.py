"""What the processor does when a request is cancelled, retried or deleted.

Each is at least once, like everything else here: a redelivered command finds the
request record saying how far it got and goes on from there. See docs/architecture.md,
"Managing requests".
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from imgpipe.contracts.events import (
    CancelRequested,
    CloudEvent,
    Counts,
    Options,
    RequestCancelled,
    RequestDeleted,
    RetryRequested,
    RetryStarted,
    cancelled_event_id,
    retry_started_event_id,
)
from imgpipe.processor import metrics
from imgpipe.processor.adapters.repository import Doc, ProcessorRepository
from imgpipe.processor.adapters.storage import Storage
from imgpipe.processor.jobs import retry_jobs, send_jobs
from imgpipe.processor.reuse import SharedOutputs
from imgpipe.processor.stops import Stops

log = logging.getLogger(__name__)

SOURCE = "imgpipe.processor"


class Publisher(Protocol):
    """The part of imgpipe.contracts.bus.Bus the commands use."""

    async def publish(self, event: CloudEvent) -> None: ...

    async def send(self, queue_key: str, body: bytes, message_id: str) -> None: ...


@dataclass
class Commands:
    repository: ProcessorRepository
    bus: Publisher
    storage: Storage
    stops: Stops
    complete: Callable[[str], Awaitable[None]]  # publishes RequestCompleted when all is done
    outputs: SharedOutputs

    async def cancel(self, command: CancelRequested) -> None:
        """No image of the request starts any more; RequestCancelled ends it at once,
        with the counts known now (images already in progress still record theirs)."""
        request_id = command.request_id
        request = await self.repository.stop(request_id, "cancelled")
        if request is None:  # its RequestReceived is still on its way: try again later
            raise LookupError(f"no request {request_id} to cancel")
        self.stops.note(request_id, request)
        if request.get("deleted") or request["completed_published"]:
            return  # over already: nothing to stop
        ok, failed = await self.repository.count_outcomes(request_id)
        data = RequestCancelled(
            request_id=request_id,
            counts=Counts(total=request["total"], ok=ok, failed=failed),
            cancelled_at=datetime.now(UTC),
            round=request.get("round", 0),
        )
        event = CloudEvent.wrap(
            data,
            source=SOURCE,
            id=cancelled_event_id(request_id),
            traceparent=request.get("traceparent"),
        )
        await self.bus.publish(event)
        await self.repository.mark_completed(request_id, ok, failed)
        metrics.REQUESTS_COMPLETED.labels(status="cancelled").inc()
        log.info("request %s: cancelled (%d ok, %d failed so far)", request_id, ok, failed)

    async def retry(self, command: RetryRequested) -> None:
        """Run the failed images of a finished request again, as round `command.round`.

        Steps, each safe to repeat: keep the failed outcomes in the history, open the
        round (they stop counting as failed), drop them from `images` so the round
        records its own, publish RetryStarted, send the jobs, mark the round sent."""
        request_id, round = command.request_id, command.round
        request = await self.repository.get_request(request_id)
        if request is None:
            raise LookupError(f"no request {request_id} to retry")
        current = request.get("round", 0)
        if request.get("deleted") or request.get("cancelled") or round < current:
            return
        if round == current and request.get("round_sent", True):
            return  # this round is under way already
        if round == current + 1:
            if not request["completed_published"]:
                log.warning("request %s: retry %d while it runs; ignored", request_id, round)
                return
            failed = await self.repository.images_with_outcome(request_id, "failed")
            await self.repository.supersede(failed, round)
            await self.repository.open_round(request_id, round, len(failed))
        elif round > current + 1:
            raise LookupError(f"request {request_id}: retry {round} before {current + 1}")
        await self._run_round(request, round)

    async def _run_round(self, request: Doc, round: int) -> None:
        request_id = request["_id"]
        failed = await self.repository.superseded(request_id, round)
        keys = [doc["image_key"] for doc in failed]
        await self.repository.drop_superseded(request_id, keys, round)
        started = RetryStarted(
            request_id=request_id, round=round, image_keys=keys, started_at=datetime.now(UTC)
        )
        event = CloudEvent.wrap(
            started,
            source=SOURCE,
            id=retry_started_event_id(request_id, round),
            traceparent=request.get("traceparent"),
        )
        await self.bus.publish(event)
        jobs = retry_jobs(
            request_id, _options(request), round, failed, refresh=bool(request.get("refresh"))
        )
        sent = await send_jobs(self.bus.send, jobs)
        await self.repository.mark_round_sent(request_id)
        log.info("request %s: retry %d of %d images sent", request_id, round, len(keys))
        if not sent:
            await self.complete(request_id)

    async def delete(self, command: RequestDeleted) -> None:
        """Stop the request, delete its stored images and its records; a tombstone of
        its id stays, so that its late jobs are dropped rather than retried.

        Shared outputs go only when no other request uses them; the image records go
        last, so a redelivered delete still finds the outputs a crash left behind."""
        request_id = command.request_id
        self.stops.note(request_id, await self.repository.stop(request_id, "deleted"))
        keys = await self.repository.outputs_of(request_id)
        gone = await self.outputs.release(request_id, keys)
        if keys:
            log.info("request %s: %d of its %d outputs deleted", request_id, gone, len(keys))
        await self.storage.delete_request(request_id)  # per-request outputs (older ones)
        await self.repository.drop_images(request_id)
        await self.repository.leave_tombstone(request_id)
        self.stops.note(request_id, {"deleted": True})
        log.info("request %s: deleted (%s)", request_id, command.reason)


def _options(request: Doc) -> Options:
    return Options.model_validate(request.get("options") or {})
