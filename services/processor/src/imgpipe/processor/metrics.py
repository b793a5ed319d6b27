"""The processor's own metrics (contracts.metrics has the shared ones and the rules)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Protocol

from prometheus_client import Counter, Gauge, Histogram

from imgpipe.contracts.bus import BusLink
from imgpipe.contracts.metrics import REGISTRY

log = logging.getLogger(__name__)
QUEUE_POLL_SECONDS = 5.0


class ImageOutcomeLike(Protocol):
    @property
    def outcome(self) -> str: ...
    @property
    def error(self) -> Mapping[str, object] | None: ...
    @property
    def bytes_in(self) -> int | None: ...
    @property
    def bytes_out(self) -> int | None: ...
    @property
    def reused(self) -> str | None: ...


# Seconds: a few ms for a compress on loopback, up to the whole-download deadline.
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

IMAGES_PROCESSED = Counter(
    "imgpipe_images_processed_total",
    "Images given an outcome, by outcome and error code ('' when ok); each URL once.",
    ["outcome", "error_code"],
    registry=REGISTRY,
)
IMAGE_BYTES_IN = Counter(
    "imgpipe_image_bytes_in_total",
    "Bytes downloaded for images given an outcome.",
    registry=REGISTRY,
)
IMAGE_BYTES_OUT = Counter(
    "imgpipe_image_bytes_out_total", "Bytes of the compressed images stored.", registry=REGISTRY
)
REQUESTS_COMPLETED = Counter(
    "imgpipe_requests_completed_total",
    "Requests whose every image has an outcome, by final status.",
    ["status"],
    registry=REGISTRY,
)
DOWNLOAD_SECONDS = Histogram(
    "imgpipe_download_duration_seconds",
    "One download attempt, from the request to the last byte (the wait for the host's "
    "turn not included).",
    buckets=_BUCKETS,
    registry=REGISTRY,
)
DOWNLOAD_ATTEMPTS = Counter(
    "imgpipe_download_attempts_total",
    "Download attempts, by result: ok, retried (a transient failure tried again), "
    "failed (the image's last word) or parked (a long wait, sent to a delay queue).",
    ["result"],
    registry=REGISTRY,
)
COMPRESS_SECONDS = Histogram(
    "imgpipe_compress_duration_seconds",
    "Decoding and encoding one image in the pool, waiting for a worker included.",
    buckets=_BUCKETS,
    registry=REGISTRY,
)
STORE_SECONDS = Histogram(
    "imgpipe_store_duration_seconds",
    "Storing one compressed image (local file or Cloudinary upload).",
    buckets=_BUCKETS,
    registry=REGISTRY,
)
IMAGES_REUSED = Counter(
    "imgpipe_images_reused_total",
    "Images given an earlier output instead of a new encode, by reason: not_modified "
    "(the host answered 304: nothing downloaded) or same_bytes (the bytes were encoded "
    "before with the same options).",
    ["reason"],
    registry=REGISTRY,
)
DOWNLOAD_BYTES_SAVED = Counter(
    "imgpipe_download_bytes_saved_total",
    "Bytes not downloaded because the host answered 304 Not Modified (the size of the "
    "bytes it had sent before).",
    registry=REGISTRY,
)
JOBS_QUEUED = Gauge(
    "imgpipe_processor_jobs_queued",
    "Jobs (up to 8 images each) waiting in the processor's jobs queue, as the broker "
    "last said: what an autoscaler watches.",
    registry=REGISTRY,
)


def count_outcome(outcome: ImageOutcomeLike) -> None:
    """An image given an outcome: by outcome and error code, with its bytes (only those
    downloaded and stored now: a reused output was stored before, and a 304 sent none)."""
    error = outcome.error
    IMAGES_PROCESSED.labels(
        outcome=outcome.outcome, error_code=str(error["code"]) if error else ""
    ).inc()
    if outcome.reused is not None:
        IMAGES_REUSED.labels(reason=outcome.reused).inc()
    if outcome.reused != "not_modified":
        IMAGE_BYTES_IN.inc(outcome.bytes_in or 0)
    if outcome.reused is None:
        IMAGE_BYTES_OUT.inc(outcome.bytes_out or 0)


async def watch_queue(link: BusLink, queue_name: str, interval: float = QUEUE_POLL_SECONDS) -> None:
    """Keep JOBS_QUEUED current: ask the broker for the queue's length every `interval`
    seconds, on a channel of its own (a passive declare that fails closes its channel)."""
    while True:
        bus = link.bus
        if bus is not None and bus.is_connected:
            try:
                channel = await bus.connection.channel()
                try:
                    queue = await channel.declare_queue(queue_name, passive=True)
                    JOBS_QUEUED.set(queue.declaration_result.message_count or 0)
                finally:
                    await channel.close()
            except Exception as exc:  # the broker going away: the next round tries again
                log.debug("jobs queue length not read: %s", exc)
        await asyncio.sleep(interval)
