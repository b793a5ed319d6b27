"""Event handlers: record what each event says, then plan the webhooks it makes due.

Handlers only write to MongoDB (so the message is acked quickly); the dispatcher
sends. Planning is idempotent: a webhook type is planned once per request and round
(the `planned` list), and a delivery is unique per (request, endpoint, type, round),
so duplicate or concurrent events never double-send.

Rounds: a retry (RetryStarted, round N) makes the request processing again, and its
RequestCompleted of round N final again. A request's round only goes up, so an event
of an earlier round arriving late (a redelivery) changes nothing. RequestDeleted
drops everything the notifier holds of the request, pending deliveries included.

ImageProcessed events are stored in batches (imgpipe.contracts.batching). Once a
request's processing webhook is planned, an image of it changes nothing until
RequestCompleted, so such requests are remembered (RecentIds) and their images only
stored, plus one read per batch for the ones whose final webhook waits for images (see
images_processed).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from imgpipe.contracts.batching import Batcher
from imgpipe.contracts.bus import is_unavailable
from imgpipe.contracts.events import (
    AnyEvent,
    ImageProcessed,
    RequestCancelled,
    RequestCompleted,
    RequestDeleted,
    RequestReceived,
    RetryStarted,
    utcnow,
)
from imgpipe.contracts.recent import RecentIds
from imgpipe.contracts.settings import Settings
from imgpipe.notifier import payloads
from imgpipe.notifier.adapters.deliveries import DeliveryDoc
from imgpipe.notifier.adapters.repository import NotifierRepository
from imgpipe.notifier.adapters.requests import RequestDoc
from imgpipe.notifier.config import NotifierConfig
from imgpipe.notifier.webhooks import (
    FINAL_TYPES,
    PENDING,
    PROCESSING,
    RECEIVED,
    planned_key,
    sequence,
)

log = logging.getLogger(__name__)
# Requests whose processing webhook this process knows is planned; a forgotten one
# costs one idempotent request update and planning pass at its next image batch.
KNOWN_REQUESTS = 4096


@dataclass(frozen=True)
class ImageArrival:
    data: ImageProcessed
    at: datetime  # the event's time


class KeyedLock:
    """One asyncio.Lock per key, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


MAX_IMAGE_BATCH = 200


@dataclass
class Deps:
    """What the handlers use, and what they remember in this process."""

    repo: NotifierRepository
    settings: Settings
    config: NotifierConfig
    wake: Callable[[], None] = lambda: None  # tells the local dispatcher there is work
    # ImageProcessed events that arrive together are stored together (see images_processed).
    _images: Batcher[ImageArrival, None] | None = field(default=None, init=False)
    _planning: KeyedLock = field(default_factory=KeyedLock, init=False)
    _processing_planned: RecentIds = field(
        default_factory=lambda: RecentIds(KNOWN_REQUESTS), init=False
    )
    # Requests deleted through this process: a plan of one, from an event handled at the
    # same time as its RequestDeleted, drops what that event wrote instead.
    _deleted: RecentIds = field(default_factory=lambda: RecentIds(KNOWN_REQUESTS), init=False)

    def image_batcher(self) -> Batcher[ImageArrival, None]:
        if self._images is None:
            window = self.config.image_batch_window
            # A batch never outgrows the prefetch (each event holds a slot until written):
            # with a small IMGPIPE_PREFETCH the window would only add latency.
            most = min(MAX_IMAGE_BATCH, self.settings.prefetch or MAX_IMAGE_BATCH)
            self._images = Batcher(self._store_images, window=window, max_batch=most)
        return self._images

    async def _store_images(self, batch: list[ImageArrival]) -> list[None]:
        await images_processed(batch, self)
        return [None] * len(batch)


async def handle_event(event: AnyEvent, deps: Deps) -> None:
    data = event.data
    now = utcnow()
    if isinstance(data, ImageProcessed):
        await deps.image_batcher().submit(ImageArrival(data, event.time))
        return
    if isinstance(data, RequestDeleted):
        await forget(data.request_id, deps)
        return
    if await deps.repo.requests.deleted_among([data.request_id]):
        return  # a late or redelivered event of a deleted request
    if isinstance(data, RequestReceived):
        request = await deps.repo.requests.mark_received(data, event.traceparent)
    elif isinstance(data, RequestCompleted):
        deps.image_batcher().hurry()  # its last images may be waiting in the batch window
        request = await deps.repo.requests.mark_completed(data, now)
    elif isinstance(data, RequestCancelled):
        deps.image_batcher().hurry()
        request = await deps.repo.requests.mark_cancelled(data, now)
    elif isinstance(data, RetryStarted):
        request = await deps.repo.requests.start_retry(data)
    else:  # commands (CancelRequested, RetryRequested) are not bound to the queue
        return
    await plan_in_turn(request, deps)


async def forget(request_id: str, deps: Deps) -> None:
    """RequestDeleted: the request's state, image outcomes, rows and deliveries (sent,
    pending or waiting to retry) go. In turn with planning, so no plan of it running
    here adds a delivery after. An attempt already in flight ends, but is not logged
    and not retried (its delivery is gone)."""
    async with deps._planning.hold(request_id):
        deps._deleted.add(request_id)
        deleted = await _drop(request_id, deps)
    log.info("request %s deleted: %d deliveries dropped", request_id, deleted)


async def _drop(request_id: str, deps: Deps) -> int:
    await deps.repo.requests.forget(request_id, utcnow())
    return await deps.repo.deliveries.delete_for_request(request_id)


async def plan_in_turn(request: RequestDoc, deps: Deps) -> set[str]:
    """Plan one request at a time in this process, stamped when its turn comes.

    Deliveries are listed and sent in creation-time order. Two plans of one request
    running at once (an ImageProcessed batch and its RequestCompleted) could stamp the
    later webhook type earlier than the one before it; taking turns, and the time then,
    keeps the stamps in lifecycle order."""
    async with deps._planning.hold(request["_id"]):
        if request["_id"] in deps._deleted:
            await _drop(request["_id"], deps)
            return set()
        return await plan(request, deps, utcnow())


async def images_processed(batch: list[ImageArrival], deps: Deps) -> None:
    """A batch of ImageProcessed: one bulk insert for the images, then per request either
    nothing (its processing webhook is known to be planned) or one request update and a
    planning pass. The known ones whose final webhook is still pending are read back
    (one query for the batch) and planned: that final may have been waiting for these
    images. Reading after storing closes the race with a RequestCompleted handled at the
    same time, here or in another instance: it sets `final_pending` before counting
    images, so either its count sees these images or this read sees the flag."""
    deleted = await deps.repo.requests.deleted_among(list({a.data.request_id for a in batch}))
    if deleted:
        batch = [arrival for arrival in batch if arrival.data.request_id not in deleted]
    await deps.repo.requests.store_images([arrival.data for arrival in batch])
    first_at = _first_arrivals(batch)
    known = [request_id for request_id in first_at if request_id in deps._processing_planned]
    for request in await deps.repo.requests.pending_finals(known):
        await plan_in_turn(request, deps)
    for request_id, at in first_at.items():
        if request_id not in known:
            request = await deps.repo.requests.note_processing(request_id, at)
            if PROCESSING in await plan_in_turn(request, deps):
                deps._processing_planned.add(request_id)


def _first_arrivals(batch: list[ImageArrival]) -> dict[str, datetime]:
    """The earliest event time per request in the batch."""
    first_at: dict[str, datetime] = {}
    for arrival in batch:
        request_id = arrival.data.request_id
        first_at[request_id] = min(arrival.at, first_at.get(request_id, arrival.at))
    return first_at


async def plan(request: RequestDoc, deps: Deps, now: datetime) -> set[str]:
    """Create the deliveries for every status change that is due and not yet planned;
    returns the webhook types planned by now (`planned_key`s: round N's are marked).

    Nothing goes out before RequestReceived: it carries the webhook URL and the rows.
    Types are planned in lifecycle order, round after round, so a later webhook's
    deliveries always exist after the earlier ones' (the dispatcher relies on that for
    ordering). Only the current round's processing and final are planned, and an
    earlier round's final still held back (for images, see _final_ready) goes first.
    """
    if not request.get("received"):
        return set()
    planned = set(request.get("planned") or [])
    current = request.get("round", 0)
    ended = ended_round(request)
    created = False
    if RECEIVED not in planned:
        created |= await _emit(RECEIVED, payloads.received(request), request, deps, now)
        planned.add(RECEIVED)
    if ended is not None and ended < current:  # a retry started: that final waits no more
        created |= await _plan_final(request, planned, deps, now, ended, force=True)
    started = current > 0 or request.get("first_processed_at") or ended is not None
    if planned_key(PROCESSING, current) not in planned and started:
        ok, failed = await deps.repo.requests.image_counts(request["_id"])
        payload = payloads.processing(request, ok, failed, current)
        created |= await _emit(PROCESSING, payload, request, deps, now, current)
        planned.add(planned_key(PROCESSING, current))
    if ended == current:
        created |= await _plan_final(request, planned, deps, now, current)
    if created:
        deps.wake()
    return planned


def ended_round(request: RequestDoc) -> int | None:
    """The round whose end is stored (None: no run ended yet)."""
    if "completed" not in request:
        return None
    return request.get("completed_round", 0)  # documents older than rounds: round 0


async def _plan_final(
    request: RequestDoc,
    planned: set[str],
    deps: Deps,
    now: datetime,
    round: int,
    *,
    force: bool = False,
) -> bool:
    """The completed, error or cancelled webhook of `round`, once every image is stored
    (or the grace is over, or `force`)."""
    final_type = f"request.{request['completed']['status']}"
    if any(planned_key(kind, round) in planned for kind in FINAL_TYPES):
        if request.get("final_pending"):  # a duplicate RequestCompleted
            await deps.repo.requests.mark_planned(request["_id"], final_type, round)
        return False
    if not force and not await _final_ready(request, deps, now, round):
        return False
    products = await _products(request, deps)
    sizes = await deps.repo.requests.image_bytes(request["_id"])
    payload = payloads.final(final_type, request, products, sizes, deps.settings, round)
    planned.add(planned_key(final_type, round))
    return await _emit(final_type, payload, request, deps, now, round)


async def plan_overdue(deps: Deps) -> None:
    """Send final webhooks whose missing ImageProcessed events never came in the grace time."""
    now = utcnow()
    cutoff = now - timedelta(seconds=deps.config.completion_grace)
    for request in await deps.repo.requests.overdue_finals(cutoff):
        await plan_in_turn(request, deps)


async def sweep_overdue_forever(deps: Deps) -> None:
    """Final webhooks held back for missing image outcomes go out after the grace time."""
    interval = max(deps.config.poll_interval, min(deps.config.completion_grace / 4, 5.0))
    while True:
        await asyncio.sleep(interval)
        try:
            await plan_overdue(deps)
        except Exception as exc:  # the database may be away for a while: next round
            if is_unavailable(exc):
                log.warning("sweep of held-back final webhooks failed: database unavailable")
            else:
                log.exception("sweep of held-back final webhooks failed")


async def _final_ready(request: RequestDoc, deps: Deps, now: datetime, round: int) -> bool:
    """Wait for every image outcome (events may overtake each other), at most the grace:
    all of the request's; a retry's, all of its images'; a cancelled request's, as many
    as it counted when it stopped."""
    seen_at = request["completed_seen_at"]
    if seen_at <= now - timedelta(seconds=deps.config.completion_grace):
        return True
    completion = request["completed"]
    counts = completion["counts"]
    retry = request.get("retry")
    if completion["status"] != "cancelled" and round and retry and retry["round"] == round:
        return await deps.repo.requests.round_image_total(request["_id"], round) >= retry["images"]
    wanted = counts["total"]
    if completion["status"] == "cancelled":
        wanted = counts["ok"] + counts["failed"]
    return await deps.repo.requests.image_total(request["_id"]) >= wanted


async def _products(request: RequestDoc, deps: Deps) -> list[payloads.Product] | None:
    """The products, or None for a request too large to list them (nothing is read)."""
    if request["image_count"] > deps.config.max_products_images:
        return None
    rows = await deps.repo.requests.load_rows(request["_id"])
    images = await deps.repo.requests.load_images(request["_id"])
    return payloads.products(rows, images)


async def _emit(
    event_type: str,
    payload: payloads.Payload,
    request: RequestDoc,
    deps: Deps,
    now: datetime,
    round: int = 0,
) -> bool:
    """One delivery per endpoint (the request's webhook URL, then matching subscriptions)."""
    targets: dict[str, str | None] = {}
    if webhook_url := request.get("webhook_url"):
        targets[webhook_url] = None
    for subscription in await deps.repo.subscriptions.wanting(event_type):
        targets.setdefault(subscription["url"], subscription["_id"])
    body = payloads.dumps(payload)
    created = False
    for endpoint, subscription_id in targets.items():
        doc = new_delivery(
            request["_id"],
            event_type,
            endpoint,
            subscription_id,
            body,
            now,
            round,
            traceparent=request.get("traceparent"),
        )
        created |= await deps.repo.deliveries.add(doc)
    await deps.repo.requests.mark_planned(request["_id"], event_type, round)
    return created


def webhook_id(request_id: str, event_type: str, round: int = 0) -> str:
    """The `webhook-id`: stable for the same fact, so receivers can dedupe retries; a
    retry round's status changes are new facts (round 0 keeps the ids it always had)."""
    fact = f"{request_id}\n{event_type}" + (f"\nr{round}" if round else "")
    digest = hashlib.sha256(fact.encode()).hexdigest()
    return f"msg_{digest[:32]}"


def new_delivery(
    request_id: str,
    event_type: str,
    endpoint: str,
    subscription_id: str | None,
    body: str,
    now: datetime,
    round: int = 0,
    traceparent: str | None = None,
) -> DeliveryDoc:
    return {
        "_id": f"dlv_{uuid.uuid4().hex}",
        "webhook_id": webhook_id(request_id, event_type, round),
        "request_id": request_id,
        "event_type": event_type,
        "round": round,
        "seq": sequence(event_type, round),
        "endpoint": endpoint,
        "subscription_id": subscription_id,
        "body": body,
        "status": PENDING,
        "tries": 0,
        "attempts": [],
        "next_attempt_at": now,
        "lease_until": now,
        "lease_owner": None,
        "created_at": now,
        "updated_at": now,
        "delivered_at": None,
        "traceparent": traceparent,
    }
