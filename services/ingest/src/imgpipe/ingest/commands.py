"""Commands on a submitted request: cancel, retry, delete, and the retention sweep.

Ingest is the write side: it checks a command against what it knows of the request's
run (from the processor's events, `follow_run`) and publishes it as an event; the
processor does the work, and the status and notifier services follow the outcome.
See docs/architecture.md, "Managing requests".
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Literal

from imgpipe.contracts.events import (
    AnyEvent,
    CancelRequested,
    CloudEvent,
    RequestCancelled,
    RequestCompleted,
    RequestDeleted,
    RetryRequested,
    RetryStarted,
    cancel_requested_event_id,
    deleted_event_id,
    retry_requested_event_id,
    utcnow,
)
from imgpipe.ingest.adapters.idempotency import IdempotencyKeys
from imgpipe.ingest.adapters.repository import IngestRepository
from imgpipe.ingest.domain import (
    SOURCE,
    Conflict,
    PublishFailed,
    Run,
    StoreUnavailable,
    UnknownRequest,
)
from imgpipe.ingest.handlers import Publisher

log = logging.getLogger(__name__)

RETENTION_BATCH = 100  # requests deleted per sweep step


async def follow_run(event: AnyEvent, repository: IngestRepository) -> None:
    """Keep the request's run up to date with the processor's events."""
    data = event.data
    if isinstance(data, RequestCompleted):
        run = Run.ended(data.status, data.counts.failed, data.completed_at, data.round)
    elif isinstance(data, RequestCancelled):
        run = Run.ended("cancelled", data.counts.failed, data.cancelled_at, data.round)
    elif isinstance(data, RetryStarted):
        run = Run().retrying(data.round)
    else:
        return
    await repository.follow(data.request_id, run)


async def _run_of(request_id: str, repository: IngestRepository) -> Run:
    run = await repository.get_run(request_id)
    if run is None:
        raise UnknownRequest(request_id)
    return run


async def cancel(
    request_id: str,
    repository: IngestRepository,
    publisher: Publisher,
    clock: Callable[[], datetime] = utcnow,
) -> None:
    """Ask the processor to stop a running request; asking twice is harmless."""
    run = await _run_of(request_id, repository)
    if run.finished:
        raise Conflict(f"the request is {run.state} already: there is nothing to cancel")
    data = CancelRequested(request_id=request_id, requested_at=clock())
    await _publish(publisher, data, cancel_requested_event_id(request_id))
    log.info("request %s: cancel requested", request_id)


async def retry(
    request_id: str,
    repository: IngestRepository,
    publisher: Publisher,
    clock: Callable[[], datetime] = utcnow,
) -> int:
    """Ask the processor to run a finished request's failed images again; the round."""
    run = await _run_of(request_id, repository)
    if not run.finished:
        raise Conflict("the request is still running: retry it once it has finished")
    if run.state == "cancelled":
        raise Conflict("a cancelled request cannot be retried: upload its CSV again")
    if run.failed == 0:
        raise Conflict("no image of the request failed: there is nothing to retry")
    round = run.round + 1
    if not await repository.replace_run(request_id, run, run.retrying(round)):
        raise Conflict("the request changed meanwhile (a retry is starting): look again")
    data = RetryRequested(request_id=request_id, round=round, requested_at=clock())
    try:
        await _publish(publisher, data, retry_requested_event_id(request_id, round))
    except PublishFailed:
        await repository.replace_run(request_id, run.retrying(round), run)  # as it was
        raise
    log.info("request %s: retry %d requested (%d failed images)", request_id, round, run.failed)
    return round


async def delete(
    request_id: str,
    repository: IngestRepository,
    publisher: Publisher,
    keys: IdempotencyKeys,
    reason: Literal["user", "retention"] = "user",
    clock: Callable[[], datetime] = utcnow,
) -> None:
    """Tell every service to drop the request, then drop ingest's own copy. Published
    first: a request ingest forgot but the others kept could not be deleted again."""
    await _run_of(request_id, repository)
    data = RequestDeleted(request_id=request_id, reason=reason, deleted_at=clock())
    await _publish(publisher, data, deleted_event_id(request_id))
    await repository.delete(request_id)
    await keys.forget(request_id)
    log.info("request %s: deleted (%s)", request_id, reason)


async def _publish(
    publisher: Publisher,
    data: CancelRequested | RetryRequested | RequestDeleted,
    event_id: str,
) -> None:
    """Raises PublishFailed when the broker does not confirm (HTTP 503: try again)."""
    await publisher.publish(CloudEvent.wrap(data, source=SOURCE, id=event_id))


async def sweep_retention(
    repository: IngestRepository,
    publisher: Publisher,
    keys: IdempotencyKeys,
    days: float,
    clock: Callable[[], datetime] = utcnow,
) -> int:
    """Delete requests that finished more than `days` ago; returns how many."""
    before = clock() - timedelta(days=days)
    deleted = 0
    while ids := await repository.finished_before(before, RETENTION_BATCH):
        for request_id in ids:
            await delete(request_id, repository, publisher, keys, "retention", clock)
            deleted += 1
    return deleted


async def run_retention(
    repository: IngestRepository,
    publisher: Publisher,
    keys: IdempotencyKeys,
    *,
    days: float,
    interval: float,
) -> None:
    """The sweep loop the Runtime runs when IMGPIPE_RETENTION_DAYS is set."""
    while True:
        try:
            if publisher.is_connected and (
                count := await sweep_retention(repository, publisher, keys, days)
            ):
                log.info("retention: %d requests older than %g days deleted", count, days)
        except (StoreUnavailable, PublishFailed) as exc:
            log.warning("retention sweep: %s; trying again later", exc)
        except Exception:
            log.exception("retention sweep failed")
        await asyncio.sleep(interval)
