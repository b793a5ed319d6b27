"""Download one image: streaming, capped in size, sniffed for a real image format, polite
to its host and patient with it (docs/architecture.md, "Downloads").

The body is read as it comes off the wire, never decoded: images are compressed
already, so the request asks for no Content-Encoding and a response that has one anyway
is refused. Decoding would let a few hundred gzipped bytes inflate to gigabytes before
the size cap saw them.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx

from imgpipe.contracts.outbound import NameNotResolved, URLRefused
from imgpipe.contracts.retry_after import parse_retry_after
from imgpipe.processor import metrics
from imgpipe.processor.adapters.host_limits import (
    HostBusy,
    HostLimits,
    HostPaused,
    Slot,
    origin,
)

# Leading bytes of the formats we accept, whatever the Content-Type header claims.
_MAGIC: tuple[tuple[bytes, ...], ...] = (
    (b"\xff\xd8\xff",),  # JPEG
    (b"\x89PNG\r\n\x1a\n",),  # PNG
    (b"GIF87a", b"GIF89a"),  # GIF
    (b"BM",),  # BMP
    (b"II*\x00", b"MM\x00*"),  # TIFF
)


# The longest wait held in place, inside the job; longer ones park the image.
WAIT_IN_PLACE = 5.0
# Exponential backoff's first step, in seconds, as AWS's SDKs do it: short for an error
# (a 5xx, a reset, a timeout: a hiccup is over soon, and each wait holds its job; up to
# 0.25 s, then 0.5 s, 1 s), longer for a 429 that names no pause (up to 1 s, 2 s, 4 s).
BACKOFF_BASE = 0.25
THROTTLED_BACKOFF_BASE = 1.0

# Redirect hops keep the headers, so every hop asks for the body as is.
_AS_IS = {"Accept-Encoding": "identity"}


# Answers worth asking again: the host may answer differently in a moment (RFC 9110
# says 408 and 503 may be retried; 425 asks for it; 429 asks for a pause).
TRANSIENT_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
# Answers that mean "too many requests from you": the host's limit shrinks.
THROTTLING_STATUSES = frozenset({429, 503})


class DownloadError(Exception):
    """A download that yields no image; `code` goes into ImageProcessed.error.

    `transient` says another attempt may succeed; `retry_after` is the pause the host
    asked for (seconds), `throttled` that it asked us to slow down."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        transient: bool = False,
        retry_after: float | None = None,
        throttled: bool = False,
        status: int | None = None,
    ) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.transient = transient
        self.retry_after = retry_after
        self.throttled = throttled
        self.status = status  # the HTTP status, when the host answered


def looks_like_image(data: bytes) -> bool:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return True
    return any(data.startswith(magic) for group in _MAGIC for magic in group)


@dataclass(frozen=True)
class Validators:
    """What a host said of a URL's bytes (RFC 9110, 8.8): sent back on the next download
    of the URL, so that the host can answer 304 Not Modified instead of the bytes."""

    etag: str | None = None
    last_modified: str | None = None

    @classmethod
    def of(cls, response: httpx.Response) -> Validators:
        # A weak ETag (W/"...") is fine for If-None-Match, which compares weakly.
        return cls(response.headers.get("ETag"), response.headers.get("Last-Modified"))

    def __bool__(self) -> bool:
        return bool(self.etag or self.last_modified)

    def headers(self) -> dict[str, str]:
        """The conditional request's headers; the host ignores If-Modified-Since when
        If-None-Match is there (RFC 9110, 13.1.3)."""
        headers = {}
        if self.etag:
            headers["If-None-Match"] = self.etag
        if self.last_modified:
            headers["If-Modified-Since"] = self.last_modified
        return headers


@dataclass(frozen=True)
class Fetched:
    """One answer: the image's bytes, or None when the host said 304 Not Modified (only
    ever to a conditional request), and the validators the answer carried."""

    body: bytes | None
    validators: Validators


async def download(
    client: httpx.AsyncClient, url: str, max_bytes: int, deadline: float | None = None
) -> bytes:
    """GET `url` once and return its body; raises DownloadError for every way it can fail."""
    fetched = await fetch(client, url, max_bytes, deadline)
    assert fetched.body is not None  # an unconditional GET is never answered 304
    return fetched.body


async def fetch(
    client: httpx.AsyncClient,
    url: str,
    max_bytes: int,
    deadline: float | None = None,
    validators: Validators | None = None,
) -> Fetched:
    """GET `url` once, conditionally when `validators` are given; raises DownloadError for
    every way it can fail.

    httpx's timeouts bound each connect, read and write; `deadline` bounds the whole
    download, so a server that drips a byte at a time cannot hold a worker for long."""
    try:
        async with asyncio.timeout(deadline):
            return await _fetch(client, url, max_bytes, validators or Validators())
    except TimeoutError:
        message = f"the download from {_host(url)} took longer than {deadline:g} s"
        raise DownloadError("timeout", message, transient=True) from None


async def _fetch(
    client: httpx.AsyncClient, url: str, max_bytes: int, validators: Validators
) -> Fetched:
    # The same guarded client as any download: a 304 passes every check a 200 does
    # (scheme, address, each redirect hop), it only carries no body to read.
    headers = {**_AS_IS, **validators.headers()}
    try:
        async with client.stream("GET", url, headers=headers) as response:
            if response.status_code == 304 and validators:
                # Its body, if any, is never read; new validators replace the old.
                return Fetched(None, Validators.of(response) or validators)
            if not response.is_success:
                raise _http_error(response)
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise _too_large(max_bytes)
            _check_not_encoded(response)
            # Chunks joined once at the end: one copy, rather than a growing bytearray's
            # reallocations plus the final bytes() copy of ~500 KB on the event loop.
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_raw():
                chunks.append(chunk)
                size += len(chunk)
                if size > max_bytes:  # stop reading: never hold more than the cap
                    raise _too_large(max_bytes)
            answered = Validators.of(response)
    except httpx.TimeoutException as exc:
        message = f"timed out downloading the image from {_host(url)} ({exc})"
        raise DownloadError("timeout", message, transient=True) from None
    except URLRefused as exc:
        raise DownloadError(exc.code, exc.reason) from None
    except httpx.TooManyRedirects:
        raise DownloadError("download_failed", "too many redirects") from None
    except NameNotResolved as exc:
        raise DownloadError("download_failed", str(exc), transient=exc.temporary) from None
    except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError) as exc:
        # Refused, reset, or cut short: a host restarting or shedding load.
        message = str(exc) or type(exc).__name__
        raise DownloadError("download_failed", message, transient=True) from None
    except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError) as exc:
        raise DownloadError("download_failed", str(exc) or type(exc).__name__) from None
    body = b"".join(chunks)  # a single chunk is returned as is, not copied
    if not looks_like_image(body[:16]):
        raise DownloadError(
            "not_an_image", "the content is not a JPEG, PNG, GIF, WebP, BMP or TIFF image"
        )
    return Fetched(body, answered)


def _http_error(response: httpx.Response) -> DownloadError:
    status = response.status_code
    answer = f"HTTP {status} {response.reason_phrase}".strip()
    return DownloadError(
        "http_error",
        f"{answer} from {_host(str(response.url))}",
        transient=status in TRANSIENT_STATUSES,
        retry_after=parse_retry_after(response.headers.get("Retry-After")),
        throttled=status in THROTTLING_STATUSES,
        status=status,
    )


@dataclass(frozen=True)
class Attempts:
    """Download attempts made for one image so far; `first_at` is wall-clock time (epoch
    seconds), so it means the same in whichever process picks a parked image up."""

    count: int = 0
    first_at: float | None = None

    def another(self) -> Attempts:
        return Attempts(self.count + 1, self.first_at if self.first_at else time.time())

    def summary(self) -> str:
        """ "after 4 attempts over 41 s", or "" after one attempt."""
        if self.count <= 1:
            return ""
        spent = time.time() - (self.first_at or time.time())
        return f"after {self.count} attempts over {spent:.0f} s"


@dataclass(frozen=True)
class Downloaded:
    """The image's bytes, or, for `not_modified`, none (b""): the host answered a
    conditional request 304, and the bytes it has are those last downloaded."""

    body: bytes
    attempts: Attempts
    validators: Validators = Validators()
    not_modified: bool = False


class RetryLater(Exception):
    """The image is to be tried again in `delay` seconds: longer than is worth holding
    its job for, so the caller parks it."""

    def __init__(self, delay: float, attempts: Attempts, last_error: DownloadError | None) -> None:
        super().__init__(f"retry in {delay:.1f} s")
        self.delay = delay
        self.attempts = attempts
        self.last_error = last_error


class FailedDownload(DownloadError):
    """The last word on an image's download: `attempts` says how many were made."""

    def __init__(self, error: DownloadError, attempts: Attempts) -> None:
        summary = attempts.summary()
        message = f"{error.message} {summary}" if summary else error.message
        super().__init__(error.code, message)
        self.attempts = attempts


@dataclass(frozen=True)
class RetryPolicy:
    """How long to keep asking (IMGPIPE_DOWNLOAD_ATTEMPTS, IMGPIPE_MAX_RETRY_WAIT)."""

    attempts: int = 4
    max_wait: float = 300.0  # the longest pause honoured, asked for or backed off
    wait_in_place: float = WAIT_IN_PLACE
    backoff_base: float = BACKOFF_BASE
    throttled_backoff_base: float = THROTTLED_BACKOFF_BASE
    # A slow host with many images queued: past this wait for a slot, the image parks
    # and comes back in `busy_retry` s, so that no job waits near RabbitMQ's
    # consumer_timeout (30 min) for its turn at a host.
    max_queue: float = 60.0
    busy_retry: float = 10.0

    def delay(self, error: DownloadError, attempts: Attempts) -> float:
        """The host's Retry-After if it gave one, else exponential backoff with full
        jitter (a random wait up to base * 2^(n-1)), so that images that failed together
        do not come back together; never more than `max_wait`."""
        if error.retry_after is not None:
            return min(error.retry_after, self.max_wait)
        base = self.throttled_backoff_base if error.status == 429 else self.backoff_base
        ceiling = base * 2 ** max(0, attempts.count - 1)
        return random.uniform(0, min(ceiling, self.max_wait))


# Asked before each attempt: False when the image is no longer wanted (its request was
# cancelled or deleted meanwhile).
Wanted = Callable[[], Awaitable[bool]]


class NotWanted(Exception):
    """The download did not start: `wanted` said no."""


@dataclass(frozen=True)
class Downloader:
    """Downloads with the processor's limits: per-host politeness and retries.

    A transient failure (TRANSIENT_STATUSES, refused or reset connections, timeouts) is
    tried again, up to `policy.attempts` attempts in all; any other fails at once. A wait
    of up to `policy.wait_in_place` seconds is waited here (the job's other images go
    on meanwhile); a longer one raises RetryLater, for the caller to park the image."""

    client: httpx.AsyncClient
    max_bytes: int
    deadline: float | None
    hosts: HostLimits = field(default_factory=lambda: HostLimits(6))
    policy: RetryPolicy = RetryPolicy()

    async def __call__(
        self,
        url: str,
        earlier: Attempts = Attempts(),
        not_before: float | None = None,
        wanted: Wanted | None = None,
        validators: Validators | None = None,
    ) -> Downloaded:
        """Download `url`, counting on from `earlier` attempts, not before the wall-clock
        time `not_before` (a parked image's); conditionally when `validators` are given.
        Raises FailedDownload or RetryLater, or NotWanted when `wanted` says no as an
        attempt is about to start."""
        try:
            host = origin(url)
        except httpx.InvalidURL as exc:
            raise FailedDownload(DownloadError("download_failed", str(exc)), earlier) from None
        if not_before is not None and (wait := not_before - time.time()) > 0:
            if wait > self.policy.wait_in_place:
                raise RetryLater(wait, earlier, None)
            await asyncio.sleep(wait)
        attempts = earlier
        while True:
            try:
                retry = attempts.count > 0
                attempts = attempts.another()
                fetched = await self._attempt(host, url, retry, wanted, validators)
                metrics.DOWNLOAD_ATTEMPTS.labels(result="ok").inc()
                if fetched.body is None:
                    return Downloaded(b"", attempts, fetched.validators, not_modified=True)
                return Downloaded(fetched.body, attempts, fetched.validators)
            except HostPaused as paused:
                raise RetryLater(paused.seconds, _undo(attempts), None) from None
            except HostBusy:
                raise RetryLater(self.policy.busy_retry, _undo(attempts), None) from None
            except DownloadError as error:
                if not error.transient or attempts.count >= self.policy.attempts:
                    metrics.DOWNLOAD_ATTEMPTS.labels(result="failed").inc()
                    raise FailedDownload(error, attempts) from None
                delay = self.policy.delay(error, attempts)
                if delay > self.policy.wait_in_place:
                    metrics.DOWNLOAD_ATTEMPTS.labels(result="parked").inc()
                    raise RetryLater(delay, attempts, error) from None
                metrics.DOWNLOAD_ATTEMPTS.labels(result="retried").inc()
                await asyncio.sleep(delay)

    async def _attempt(
        self,
        host: str,
        url: str,
        retry: bool,
        wanted: Wanted | None,
        validators: Validators | None,
    ) -> Fetched:
        async with self.hosts.slot(
            host, self.policy.wait_in_place, max_queue=self.policy.max_queue, retry=retry
        ) as slot:
            # Asked last thing before the request goes out: the wait for a busy host's
            # turn can be long, and what was wanted when it began may not be any more.
            if wanted is not None and not await wanted():
                raise NotWanted(url)
            try:
                with metrics.DOWNLOAD_SECONDS.time():
                    fetched = await fetch(
                        self.client, url, self.max_bytes, self.deadline, validators
                    )
            except DownloadError as error:
                if error.throttled:
                    self._throttled(slot, error)
                raise
            self.hosts.succeeded(slot)
            return fetched

    def _throttled(self, slot: Slot, error: DownloadError) -> None:
        pause = error.retry_after
        certain = error.status == 429 or pause is not None
        capped = min(pause, self.policy.max_wait) if pause is not None else None
        self.hosts.throttled(slot, capped, certain=certain)

    async def aclose(self) -> None:
        await self.client.aclose()


def _undo(attempts: Attempts) -> Attempts:
    """The attempt that never started (its host was paused) does not count."""
    return Attempts(attempts.count - 1, attempts.first_at if attempts.count > 1 else None)


def _check_not_encoded(response: httpx.Response) -> None:
    encoding = response.headers.get("Content-Encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        raise DownloadError(
            "download_failed",
            f"the server sent the image {encoding}-encoded, though asked to send it as is",
        )


def _too_large(max_bytes: int) -> DownloadError:
    return DownloadError("too_large", f"the image is larger than {max_bytes} bytes")


def _host(url: str) -> str:
    """The host (and port, if any) as a user would name it in an error message."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        return "the host"
    return f"{parsed.host}:{parsed.port}" if parsed.port else parsed.host
