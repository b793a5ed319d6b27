"""What ingest does, apart from HTTP: accept an upload, publish it, relay the outbox."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, BinaryIO, Protocol

from imgpipe.contracts.events import CloudEvent, Options, utcnow
from imgpipe.contracts.logs import request_context
from imgpipe.contracts.tracing import current_traceparent
from imgpipe.contracts.urls import url_problem
from imgpipe.ingest import metrics
from imgpipe.ingest.csv_input import CsvLimits, CsvRejected, parse_csv
from imgpipe.ingest.domain import (
    IdempotencyConflict,
    IngestRequest,
    Problem,
    PublishFailed,
    StoreUnavailable,
    UploadRejected,
    new_request_id,
)

log = logging.getLogger(__name__)


class Repository(Protocol):
    async def add(self, request: IngestRequest, *, relay_after: datetime) -> None: ...
    async def mark_published(self, request_id: str, at: datetime) -> None: ...
    async def claim_unpublished(self, now: datetime, lease: timedelta) -> IngestRequest | None: ...


class KeyStore(Protocol):
    async def claim(self, key_id: str, fingerprint: str, token: str, now: datetime) -> bool: ...
    async def find(self, key_id: str) -> dict[str, Any] | None: ...
    async def complete(
        self, key_id: str, token: str, request_id: str, answer: dict[str, Any]
    ) -> None: ...
    async def release(self, key_id: str, token: str) -> None: ...


class Publisher(Protocol):
    @property
    def is_connected(self) -> bool: ...
    async def publish(self, event: CloudEvent) -> None: ...


@dataclass(frozen=True)
class Upload:
    file: BinaryIO
    options: Options = field(default_factory=Options)
    webhook_url: str | None = None
    refresh: bool = False  # reuse no earlier output


async def accept_upload(
    upload: Upload,
    *,
    limits: CsvLimits,
    repository: Repository,
    publisher: Publisher,
    relay_grace: timedelta,
    clock: Callable[[], datetime] = utcnow,
) -> IngestRequest:
    """Validate, store, publish. Raises UploadRejected (4xx) or StoreUnavailable (503)."""
    request = await parse_upload(upload, limits, clock)
    with request_context(request.request_id):
        await repository.add(request, relay_after=request.received_at + relay_grace)
        metrics.REQUESTS_RECEIVED.inc()
        metrics.IMAGES_RECEIVED.inc(request.image_count)
        await publish_received(request, repository, publisher, clock)
    return request


MAX_KEY_CHARS = 255
KEY_LIFETIME = timedelta(hours=24)
# A second upload with a key waits this long for the first to be stored, then gets 409.
CLAIM_WAIT = 10.0
CLAIM_POLL = 0.05
# A claim with no answer this old was left by an upload that died (or could not release
# it while the database was down): a new upload with the key may take it over.
STALE_CLAIM = timedelta(minutes=2)


def key_id(key: str, api_key: str | None) -> str:
    """Where a key is stored: scoped by the caller's API key (hashed: the database never
    holds a key), so two clients using the same Idempotency-Key never meet."""
    scope = "open" if api_key is None else hashlib.sha256(api_key.encode()).hexdigest()[:32]
    return f"{scope}/{key}"


def fingerprint(upload: Upload) -> str:
    """SHA-256 over the file's bytes and the form fields; the file is read and rewound."""
    digest = hashlib.sha256()
    while chunk := upload.file.read(1 << 20):
        digest.update(chunk)
    upload.file.seek(0)
    fields: dict[str, Any] = {
        "options": upload.options.model_dump(),
        "webhook_url": (upload.webhook_url or "").strip() or None,
    }
    if upload.refresh:  # only when set: keys of uploads made before it keep their prints
        fields["refresh"] = True
    digest.update(json.dumps(fields, sort_keys=True).encode())
    return digest.hexdigest()


async def accept_once(
    upload: Upload,
    key_id: str,
    *,
    keys: KeyStore,
    accept: Callable[[], Awaitable[IngestRequest]],
    answer: Callable[[str], dict[str, Any]],
    clock: Callable[[], datetime] = utcnow,
) -> dict[str, Any]:
    """`accept` the upload once per key: the first upload with a key is accepted and its
    202 body kept; the same upload again gets that body back, unchanged. A different
    upload with the key, or the same one while the first is still being stored past
    `CLAIM_WAIT`, raises IdempotencyConflict. A refused or unstored upload gives the key
    up, so the client may retry with it."""
    mine = await asyncio.to_thread(fingerprint, upload)
    token = uuid.uuid4().hex
    deadline = time.monotonic() + CLAIM_WAIT
    while not await keys.claim(key_id, mine, token, clock()):
        held = await keys.find(key_id)
        if held is None:
            continue  # given up meanwhile: claim it again
        now = clock()
        expired = held["created_at"] + KEY_LIFETIME <= now
        if expired or (held["answer"] is None and held["created_at"] + STALE_CLAIM <= now):
            await keys.release(key_id, held["token"])  # only that claim, if still there
            continue
        if held["fingerprint"] != mine:
            raise IdempotencyConflict(
                "Idempotency-Key was already used for a different upload (another file or "
                "other form fields) within 24 hours: use a new key for a new upload"
            )
        if held["answer"] is not None:
            return dict(held["answer"])
        if time.monotonic() >= deadline:
            raise IdempotencyConflict(
                "an upload with this Idempotency-Key is still being accepted: retry shortly"
            )
        await asyncio.sleep(CLAIM_POLL)
    try:
        request = await accept()
    except BaseException:
        await _give_up(keys, key_id, token)
        raise
    body = answer(request.request_id)
    try:
        await keys.complete(key_id, token, request.request_id, body)
    except StoreUnavailable as exc:  # the request stands; a retry waits for STALE_CLAIM
        log.warning("request %s accepted but its key not recorded: %s", request.request_id, exc)
    return body


async def _give_up(keys: KeyStore, key_id: str, token: str) -> None:
    try:
        await keys.release(key_id, token)
    except StoreUnavailable as exc:  # the claim goes stale and is taken over then
        log.warning("could not release an idempotency key: %s", exc)


async def parse_upload(
    upload: Upload, limits: CsvLimits, clock: Callable[[], datetime] = utcnow
) -> IngestRequest:
    webhook_url = (upload.webhook_url or "").strip() or None
    problems: list[Problem] = []
    if webhook_url and (reason := url_problem(webhook_url, limits.allow_private_urls)):
        problems.append(Problem(reason.replace("URL", "webhook URL", 1), field="webhook_url"))
    try:
        # Parsing a big file is CPU work: keep it off the event loop.
        parsed = await asyncio.to_thread(parse_csv, upload.file, limits)
    except CsvRejected as rejected:
        status = 413 if rejected.too_large else 422
        raise UploadRejected(
            status, problems + rejected.problems, len(problems) + rejected.total
        ) from None
    if problems:
        raise UploadRejected(422, problems)
    request = IngestRequest(
        request_id=new_request_id(),
        rows=parsed.rows,
        options=upload.options,
        webhook_url=webhook_url,
        refresh=upload.refresh,
        received_at=clock(),
        # The upload's span: its events, and the relay's later, carry the same trace.
        traceparent=current_traceparent(),
    )
    _check_event_size(request, limits.max_event_bytes)
    return request


def _check_event_size(request: IngestRequest, max_bytes: int | None) -> None:
    """Refuse now a request the broker would refuse later: stored, it would sit in the
    outbox for ever while its client waits for a status that never moves."""
    if max_bytes is None:
        return
    size = len(request.received_event().to_bytes())
    if size > max_bytes:
        message = (
            f"the request is {size:,} bytes as an event, over the limit of {max_bytes:,}: "
            "split the file"
        )
        raise UploadRejected(413, [Problem(message, field="file")])


async def publish_received(
    request: IngestRequest,
    repository: Repository,
    publisher: Publisher,
    clock: Callable[[], datetime] = utcnow,
) -> bool:
    """Publish RequestReceived and mark it sent; False leaves it to the relay."""
    try:
        await publisher.publish(request.received_event())
    except PublishFailed as exc:
        log.warning(
            "request %s stored but not published (%s); relay will send it", request.request_id, exc
        )
        return False
    try:
        await repository.mark_published(request.request_id, clock())
    except StoreUnavailable as exc:  # it goes out again with the same id; consumers dedupe
        log.warning("request %s published but not marked: %s", request.request_id, exc)
    return True


async def relay_outbox(
    repository: Repository,
    publisher: Publisher,
    *,
    lease: timedelta,
    batch: int,
    clock: Callable[[], datetime] = utcnow,
) -> int:
    """Publish stored requests that never went out; returns how many were sent."""
    sent = 0
    while sent < batch and publisher.is_connected:
        request = await repository.claim_unpublished(clock(), lease)
        if request is None:
            break
        if not await publish_received(request, repository, publisher, clock):
            break  # the claim lapses after `lease`, then it is tried again
        log.info("outbox relay published request %s", request.request_id)
        sent += 1
    return sent


async def run_relay(
    repository: Repository,
    publisher: Publisher,
    *,
    interval: float,
    lease: timedelta,
    batch: int,
) -> None:
    """The relay loop the Runtime runs: one pass every `interval` seconds."""
    while True:
        try:
            await relay_outbox(repository, publisher, lease=lease, batch=batch)
        except StoreUnavailable as exc:
            log.warning("outbox relay: database unavailable: %s", exc)
        except Exception:
            log.exception("outbox relay pass failed")
        await asyncio.sleep(interval)
