"""The processor's logic: fan a request out into jobs of a few images, process each
image once.

Delivery is at least once, so every step is idempotent: the request doc is created
with an upsert, an image's outcome is inserted under a unique `_id` (a second one is
refused), the counter moves only for the write that stored the outcome, and events
carry stable ids. A failed image is an outcome like any other; it never blocks its
request.

An image whose host asks for a long pause is parked in a delay queue and comes back
as a job of its own (docs/architecture.md, "Downloads"); its request completes when
it has an outcome like the rest.

An image whose host answers 304 to a conditional request, or whose bytes were encoded
before with the same options, reuses that output (reuse.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any, Literal, Protocol, TypedDict

from aio_pika.abc import AbstractIncomingMessage
from pydantic import ValidationError

from imgpipe.contracts.events import (
    AnyEvent,
    CancelRequested,
    CloudEvent,
    Counts,
    ImageError,
    ImageProcessed,
    Options,
    RequestCompleted,
    RequestDeleted,
    RequestReceived,
    RetryRequested,
    completed_event_id,
    processed_event_id,
)
from imgpipe.contracts.logs import request_context
from imgpipe.contracts.metrics import DEAD_LETTERED
from imgpipe.contracts.topology import Topology
from imgpipe.contracts.tracing import current_traceparent, origin, span
from imgpipe.processor import metrics
from imgpipe.processor.adapters.download import (
    Attempts,
    Downloaded,
    Downloader,
    FailedDownload,
    NotWanted,
    RetryLater,
)
from imgpipe.processor.adapters.repository import Doc, Outcome, ProcessorRepository
from imgpipe.processor.adapters.storage import Storage, StorageError, StoredImage
from imgpipe.processor.backlog import Backlog
from imgpipe.processor.commands import Commands
from imgpipe.processor.compress import Compressed, CompressError
from imgpipe.processor.jobs import JOBS_QUEUE, Job, JobImage, Place, jobs_for, send_jobs
from imgpipe.processor.outcomes import OutcomeBatcher
from imgpipe.processor.reuse import Known, SharedOutputs, output_key, source_fields
from imgpipe.processor.stops import Stops

log = logging.getLogger(__name__)

SOURCE = "imgpipe.processor"
# Error messages may quote what a stranger's server sent (a parser's view of its bytes):
# enough to diagnose, never enough to bloat the status document or a webhook.
MAX_ERROR_MESSAGE = 500

Compressor = Callable[[bytes, Options], Awaitable[Compressed]]
# Downloaded images that may wait for the codec, per pool worker: enough that a worker
# never waits for a download, few enough to keep memory flat.
BACKLOG_PER_WORKER = 4
# Only an image that was stored has these.
_STORED_ONLY = ("bytes_out", "width", "height", "format", "kept_input", "reused", "output_key")
Reused = Literal["not_modified", "same_bytes"]


class OutcomeError(TypedDict):
    code: str
    message: str


@dataclass(frozen=True)
class ImageOutcome:
    """What an image doc holds of its outcome; copied to every place of the same URL."""

    outcome: Literal["ok", "failed"]
    processed_by: str  # which process did the work
    attempts: int | None = None  # download attempts; None when none was tried
    output_url: str | None = None
    bytes_in: int | None = None
    bytes_out: int | None = None
    width: int | None = None
    height: int | None = None
    format: str | None = None
    kept_input: bool | None = None  # the output is the input minus metadata, not an encode
    reused: Reused | None = None  # an earlier output, and why; None when encoded now
    output_key: str | None = None  # the shared output's name; None for a per-request file
    error: OutcomeError | None = None
    storage: dict[str, Any] | None = None  # what the storage backend told of the object

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> ImageOutcome:
        return cls(**{f.name: doc[f.name] for f in fields(cls) if f.name in doc})

    def to_doc(self) -> Doc:
        """The fields as stored: a failed image has no output sizes or format, and
        `storage` is there only when the backend told something."""
        doc = asdict(self)
        if self.outcome != "ok":
            for key in _STORED_ONLY:
                del doc[key]
        if self.storage is None:
            del doc["storage"]
        return doc


class Publisher(Protocol):
    """The part of imgpipe.contracts.bus.Bus the handlers use."""

    async def publish(self, event: CloudEvent) -> None: ...

    async def publish_many(self, events: Sequence[CloudEvent]) -> None: ...

    async def send(self, queue_key: str, body: bytes, message_id: str) -> None: ...


@dataclass
class Processor:
    repository: ProcessorRepository
    bus: Publisher
    storage: Storage
    download: Downloader
    compressor: Compressor
    topology: Topology
    backlog: Backlog = field(default_factory=lambda: Backlog(BACKLOG_PER_WORKER))
    instance: str = "processor"  # recorded with each outcome: which process did the work
    _completion_lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False)
    _outcomes: OutcomeBatcher = field(init=False)
    stops: Stops = field(init=False)
    commands: Commands = field(init=False)
    outputs: SharedOutputs = field(init=False)

    def __post_init__(self) -> None:
        self._outcomes = OutcomeBatcher(self.repository, self.bus.publish_many)
        self.stops = Stops(self.repository)
        self.outputs = SharedOutputs(self.repository, self.storage)
        self.commands = Commands(
            self.repository, self.bus, self.storage, self.stops, self._complete, self.outputs
        )

    # Requests and what is asked of them ---------------------------------------------

    async def on_event(self, event: AnyEvent) -> None:
        data = event.data
        if isinstance(data, RequestReceived):
            await self.request_received(data)
        elif isinstance(data, CancelRequested):
            await self.commands.cancel(data)
        elif isinstance(data, RetryRequested):
            await self.commands.retry(data)
        elif isinstance(data, RequestDeleted):
            await self.commands.delete(data)

    async def request_received(self, request: RequestReceived) -> None:
        total = sum(len(row.input_urls) for row in request.rows)
        if total != request.image_count:
            log.warning(
                "request %s: image_count %d but %d URLs; using the URLs",
                request.request_id,
                request.image_count,
                total,
            )
        doc = await self.repository.create_request(
            request.request_id,
            total=total,
            options=request.options,
            traceparent=current_traceparent(),  # the consumer span, in the request's trace
            refresh=request.refresh,
        )
        if doc.get("deleted") or doc["fanned_out"]:
            return  # deleted, or a redelivery of a request whose jobs are all sent
        sent = await send_jobs(self.bus.send, jobs_for(request))
        await self.repository.mark_fanned_out(request.request_id)
        log.info("request %s: %d images in %d jobs sent", request.request_id, total, sent)
        if not sent:  # ingest refuses these; finish rather than hang if one slips through
            await self._complete(request.request_id)

    # Jobs -------------------------------------------------------------------------

    async def on_job_message(self, message: AbstractIncomingMessage) -> None:
        try:
            job = Job.model_validate_json(message.body)
        except ValidationError:
            log.error("unparseable job %s: dead-lettered", message.message_id)
            await message.reject(requeue=False)
            DEAD_LETTERED.labels(queue=JOBS_QUEUE).inc()
            return
        with request_context(job.request_id):
            await self.process_job(job)

    async def process_job(self, job: Job) -> None:
        """Process each image of the job; each is recorded as soon as it is done, so an
        image that waits for its host holds neither the others nor a pool worker."""
        request = await self.repository.get_request(job.request_id)
        if request is None:
            # Jobs are sent after their request is stored: retry, then dead-letter.
            raise LookupError(f"no request {job.request_id} for job {job.message_id}")
        if self.stops.note(job.request_id, request) or job.round < request.get("round", 0):
            return  # cancelled or deleted, or a stale job of an earlier run
        keys = [place.image_key for image in job.images for place in image.places]
        done = await self.repository.get_images(job.request_id, keys)
        if done:  # a redelivery or a duplicate job: repeat what is known
            await self._replay(job.request_id, list(done.values()))
        known = await self._known(job, done)
        results = await asyncio.gather(
            *(
                self._process_image(job, image, done, known.get(image.input_url))
                for image in job.images
            ),
            return_exceptions=True,  # the others finish before the job is requeued
        )
        if any(result is True for result in results):
            await self._complete(job.request_id)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _known(self, job: Job, done: Mapping[str, Doc]) -> dict[str, Known]:
        """The job's URLs that may be asked for conditionally (none when refreshing)."""
        if job.refresh:
            return {}
        urls = [
            image.input_url
            for image in job.images
            if any(place.image_key not in done for place in image.places)
        ]
        return await self.outputs.known(urls, job.options) if urls else {}

    async def _process_image(
        self, job: Job, image: JobImage, done: Mapping[str, Doc], known: Known | None
    ) -> bool:
        """Give every place of `image` an outcome (unless it is parked); True when its
        request may be complete after that."""
        missing = [place for place in image.places if place.image_key not in done]
        if not missing:
            return False
        recorded = next((done[p.image_key] for p in image.places if p.image_key in done), None)
        if recorded is not None:  # a crash between two of its places' writes: copy the rest
            return await self._record(job, image, missing, ImageOutcome.from_doc(recorded))
        attributes = {
            "request_id": job.request_id,
            "image_key": image.image_key,
            "url.origin": origin(image.input_url),
        }
        with span("process image", attributes=attributes) as image_span:
            try:
                outcome = await self._image_outcome(job, image, known)
            except RetryLater as later:
                image_span.set_attribute("outcome", "parked")
                await self._park(job, image, later)
                return False
            except RequestStopped:
                image_span.set_attribute("outcome", "stopped")
                return False
            if await self.stops.reason(job.request_id) == "deleted":
                # Deleted while this image was in progress: its file must not outlive it
                # (a shared one goes only if no other request uses it).
                if outcome.output_key is not None:
                    await self.outputs.release(job.request_id, [outcome.output_key])
                await self.storage.delete_request(job.request_id)
                return False
            image_span.set_attributes(_span_attributes(outcome))
            done_now = await self._record(job, image, missing, outcome)
        metrics.count_outcome(outcome)
        return done_now

    async def _record(
        self, job: Job, image: JobImage, places: Sequence[Place], outcome: ImageOutcome
    ) -> bool:
        request_id = job.request_id
        docs = [
            {
                "request_id": request_id,
                **place.model_dump(),
                "input_url": image.input_url,
                **outcome.to_doc(),
                "round": job.round,
            }
            for place in places
        ]
        # Named now: the batch publishes them from whichever job's context flushes it.
        traceparent = current_traceparent()
        primary = image.image_key  # the place whose bytes the request's tally counts
        # Stored, counted and published together with the outcomes that finish meanwhile.
        recorded = await asyncio.gather(
            *(
                self._outcomes.record(
                    Outcome(request_id, doc["image_key"], doc, doc["image_key"] == primary),
                    processed_event(doc, traceparent),
                )
                for doc in docs
            )
        )
        lost = [doc["image_key"] for doc, r in zip(docs, recorded, strict=True) if not r.stored]
        if lost:  # a duplicate of this job stored those outcomes first: they stand
            stored = await self.repository.get_images(request_id, lost)
            await self._replay(request_id, list(stored.values()))
        return any(r.request is not None and _looks_done(r.request) for r in recorded)

    async def _park(self, job: Job, image: JobImage, later: RetryLater) -> None:
        """Send the image to a delay queue, to come back as a job of its own: a long wait
        must not hold this job's delivery (RabbitMQ's consumer_timeout) or prefetch."""
        parked = job.parked(
            image,
            attempts=later.attempts.count,
            first_attempt_at=later.attempts.first_at,
            not_before=time.time() + later.delay,
        )
        queue_key, delay = self.topology.retry_queue_for(later.delay)
        await self.bus.send(queue_key, parked.to_bytes(), parked.message_id)
        reason = later.last_error.message if later.last_error else "its host asked for a pause"
        log.info(
            "image %s of request %s parked for %.0f s (%s); back in %d s",
            image.image_key,
            job.request_id,
            later.delay,
            reason,
            delay,
        )

    async def _image_outcome(self, job: Job, image: JobImage, known: Known | None) -> ImageOutcome:
        """The outcome of one image; RetryLater when it is to wait."""
        try:
            return await self._outcome(job, image, known)
        except (RetryLater, RequestStopped):
            raise
        except Exception:
            # A bug met by one image must not fail its job's other images, nor, retried
            # past the delivery limit, leave the request without an outcome for ever.
            log.exception(
                "image %s of request %s failed unexpectedly", image.image_key, job.request_id
            )
            return self._failed("internal_error", "the image could not be processed")

    async def _outcome(self, job: Job, image: JobImage, known: Known | None) -> ImageOutcome:
        """Download, compress and store one image, or reuse an earlier output; every
        expected failure is an outcome."""
        earlier = Attempts(image.attempts, image.first_attempt_at)
        await self.backlog.room()

        async def wanted() -> bool:  # asked as each download attempt is about to start
            return await self.stops.reason(job.request_id) is None

        validators = known.validators if known is not None else None
        while True:
            try:
                with span("download") as download:
                    downloaded = await self.download(
                        image.input_url, earlier, image.not_before, wanted, validators
                    )
                    download.set_attributes(
                        {
                            "bytes": len(downloaded.body),
                            "attempts": downloaded.attempts.count,
                            "not_modified": downloaded.not_modified,
                        }
                    )
            except NotWanted:
                raise RequestStopped(job.request_id) from None
            except FailedDownload as exc:
                return self._failed(exc.code, exc.message, attempts=exc.attempts.count)
            if not downloaded.not_modified:
                return await self._encode(job, image, downloaded)
            assert known is not None  # only a conditional request is answered 304
            attempts = downloaded.attempts.count
            reused = await self._reuse(job, known.output_key, "not_modified", known.size, attempts)
            if reused is not None:
                metrics.DOWNLOAD_BYTES_SAVED.inc(known.size)
                return reused
            # Its output was deleted since the lookup: download the bytes after all.
            earlier, validators = downloaded.attempts, None

    async def _encode(self, job: Job, image: JobImage, downloaded: Downloaded) -> ImageOutcome:
        """Compress and store downloaded bytes, unless the same bytes were encoded with
        the same options before (then their output is reused)."""
        data, attempts = downloaded.body, downloaded.attempts.count
        digest = hashlib.sha256(data).hexdigest()
        fields = source_fields(image.input_url, downloaded.validators, digest, len(data))
        # Written beside the work, not before it: its batch waits for others to join.
        remembered = asyncio.create_task(self.outputs.remember(image.input_url, fields))
        try:
            return await self._encode_new(job, image, data, digest, attempts)
        finally:
            await remembered

    async def _encode_new(
        self, job: Job, image: JobImage, data: bytes, digest: str, attempts: int
    ) -> ImageOutcome:
        key = output_key(digest, job.options)
        async with self.outputs.encoding(key):  # the same bytes in this job wait, then reuse
            if not job.refresh:
                reused = await self._reuse(job, key, "same_bytes", len(data), attempts)
                if reused is not None:
                    return reused
            try:
                async with self.backlog.holding():
                    with metrics.COMPRESS_SECONDS.time(), span("compress") as compress:
                        result = await self.compressor(data, job.options)
                        compress.set_attributes(
                            {"bytes_out": len(result.data), "format": result.format}
                        )
                with metrics.STORE_SECONDS.time(), span("store") as store:
                    stored, shared = await self._store(job, image, key, result)
                    store.set_attribute("bytes", stored.size)
            except CompressError as exc:
                return self._failed(exc.code, exc.message, len(data), attempts)
            except StorageError as exc:
                return self._failed("storage_failed", str(exc), len(data), attempts)
        return ImageOutcome(
            outcome="ok",
            processed_by=self.instance,
            attempts=attempts,
            output_url=stored.url,
            bytes_in=len(data),
            bytes_out=stored.size,
            width=result.width,
            height=result.height,
            format=result.format,
            kept_input=result.kept_input,
            output_key=key if shared else None,
            storage=stored.details or None,
        )

    async def _store(
        self, job: Job, image: JobImage, key: str, result: Compressed
    ) -> tuple[StoredImage, bool]:
        """Store the output under its shared name, the request joining its users first
        (so no deletion takes the file being written); True when shared. While that name
        is being deleted, the output is the request's own file instead."""
        reserved = await self.outputs.reserve(job.request_id, key)
        if reserved is None:
            stored = await self.storage.save(
                job.request_id, image.image_key, result.data, result.format
            )
            return stored, False
        stored = await self.storage.save_shared(key, result.data, result.format)
        await self.outputs.stored(
            key,
            {
                "url": stored.url,
                "location": stored.location,
                "size": stored.size,
                "width": result.width,
                "height": result.height,
                "format": result.format,
                "kept_input": result.kept_input,
                "storage": stored.details,
            },
            reserved,
        )
        return stored, True

    async def _reuse(
        self, job: Job, key: str, reason: Reused, bytes_in: int, attempts: int
    ) -> ImageOutcome | None:
        """The outcome of a stored output, the request now among its users; None when
        there is none (or it is being deleted)."""
        output = await self.outputs.claim(job.request_id, key)
        if output is None:
            return None
        return ImageOutcome(
            outcome="ok",
            processed_by=self.instance,
            attempts=attempts,
            output_url=output["url"],
            bytes_in=bytes_in,
            bytes_out=output["size"],
            width=output.get("width"),
            height=output.get("height"),
            format=output.get("format"),
            kept_input=output.get("kept_input"),
            reused=reason,
            output_key=key,
            storage=output.get("storage"),
        )

    def _failed(
        self, code: str, message: str, bytes_in: int | None = None, attempts: int | None = None
    ) -> ImageOutcome:
        return ImageOutcome(
            outcome="failed",
            processed_by=self.instance,
            attempts=attempts,
            bytes_in=bytes_in,
            error=OutcomeError(code=code, message=_shortened(message)),
        )

    async def _replay(self, request_id: str, images: Sequence[Doc]) -> None:
        """Re-publish recorded outcomes and re-check completion. A crash between the
        outcome write and the counter bump leaves the counter behind: catch it up here."""
        await self.bus.publish_many([processed_event(image) for image in images])
        ok, failed = await self.repository.count_outcomes(request_id)
        request = await self.repository.raise_counters(request_id, ok, failed)
        if request is not None and _looks_done(request):
            await self._complete(request_id)

    # Completion -------------------------------------------------------------------

    async def _complete(self, request_id: str) -> None:
        """Publish RequestCompleted once every image has an outcome.

        Counters only trigger this; the images are counted before publishing, so a
        counter that ran ahead cannot finish a request early. Publish first, then
        mark: a crash in between re-publishes the same event id, never loses it.
        The lock keeps this process's duplicate jobs from publishing it twice."""
        async with self._completion_lock:
            request = await self.repository.get_request(request_id)
            if request is None or request.get("completed_published", True):
                return  # unknown, finished, or a tombstone
            if request.get("cancelled"):
                return  # RequestCancelled ended it
            ok, failed = await self.repository.count_outcomes(request_id)
            if ok + failed < request["total"]:
                return  # the last image's own check will finish it
            round = request.get("round", 0)
            data = RequestCompleted(
                request_id=request_id,
                status="completed" if ok >= 1 else "error",
                counts=Counts(total=request["total"], ok=ok, failed=failed),
                completed_at=datetime.now(UTC),
                round=round,
            )
            # The request's trace, whichever job happens to finish it.
            event = CloudEvent.wrap(
                data,
                source=SOURCE,
                id=completed_event_id(request_id, round),
                traceparent=request.get("traceparent"),
            )
            await self.bus.publish(event)
            metrics.REQUESTS_COMPLETED.labels(status=data.status).inc()
            await self.repository.mark_completed(request_id, ok, failed)
            log.info("request %s: %s (%d ok, %d failed)", request_id, data.status, ok, failed)


class RequestStopped(Exception):
    """The image's request was cancelled or deleted before the image started."""


def _shortened(message: str) -> str:
    if len(message) <= MAX_ERROR_MESSAGE:
        return message
    return message[: MAX_ERROR_MESSAGE - 1] + "…"


def _span_attributes(outcome: ImageOutcome) -> dict[str, str | int]:
    """What a span may tell of an outcome: no URL, no message (it may quote a server)."""
    attributes: dict[str, str | int] = {"outcome": outcome.outcome}
    if outcome.error is not None:
        attributes["error.code"] = outcome.error["code"]
    for name in ("bytes_in", "bytes_out"):
        if (value := getattr(outcome, name)) is not None:
            attributes[name] = value
    return attributes


def _looks_done(request: Mapping[str, Any]) -> bool:
    if request.get("completed_published", True):  # finished, or a deleted request's tombstone
        return False
    return bool(request["ok"] + request["failed"] >= request["total"])


def processed_event(
    image: Mapping[str, Any], traceparent: str | None = None
) -> CloudEvent[ImageProcessed]:
    """The ImageProcessed for an image doc that has an outcome (same id every time);
    without `traceparent` the bus gives it the current span's."""
    error = image.get("error")
    data = ImageProcessed(
        request_id=image["request_id"],
        image_key=image["image_key"],
        row_index=image["row_index"],
        position=image["position"],
        input_url=image["input_url"],
        outcome=image["outcome"],
        output_url=image.get("output_url"),
        bytes_in=image.get("bytes_in"),
        bytes_out=image.get("bytes_out"),
        width=image.get("width"),
        height=image.get("height"),
        format=image.get("format"),
        kept_input=image.get("kept_input"),
        reused=image.get("reused"),
        error=ImageError(**error) if error else None,
        attempts=image.get("attempts"),
        round=image.get("round", 0),
    )
    return CloudEvent.wrap(
        data,
        source=SOURCE,
        id=processed_event_id(data.request_id, data.image_key, data.round),
        traceparent=traceparent,
    )
