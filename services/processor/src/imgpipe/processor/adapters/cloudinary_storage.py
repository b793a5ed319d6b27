"""Cloudinary storage: the official SDK, one folder per request, overwrite on retry.

Chosen when CLOUDINARY_URL is set. The SDK is configured per call from that URL (never from
its global, import-time configuration), and its calls block, so each upload attempt runs in a
small thread pool of its own; the waits between attempts are asyncio sleeps and hold no
thread. 429 and 5xx are retried with backoff (honouring Retry-After); 401/403 fail at once.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from imgpipe.contracts.retry_after import parse_retry_after
from imgpipe.processor.adapters.storage import (
    SHARED_FOLDER,
    StorageError,
    StoredImage,
    object_name,
    shared_name,
)

log = logging.getLogger(__name__)

DEFAULT_FOLDER = "imgpipe"
DEFAULT_API = "https://api.cloudinary.com"
URL_SHAPE = "cloudinary://API_KEY:API_SECRET@CLOUD_NAME"
SIGNATURE_ALGORITHMS = ("sha1", "sha256")
# Query parameters of CLOUDINARY_URL that imgpipe uses (the SDK's names); others are ignored.
URL_OPTIONS = ("upload_prefix", "signature_algorithm")
# Connections the SDK keeps per host: at least as many as upload threads, or urllib3
# drops the extra ones after each upload (and warns about it).
MAX_THREADS = 16

_CLOUD_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_FOLDER = re.compile(r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$")
_MESSAGE_LIMIT = 300


class CloudinaryConfigError(ValueError):
    """CLOUDINARY_URL or CLOUDINARY_FOLDER cannot work: refused at start-up."""


@dataclass(frozen=True)
class CloudinaryConfig:
    cloud_name: str
    api_key: str
    api_secret: str = field(repr=False)  # never in a repr, a log line or an error message
    upload_prefix: str = DEFAULT_API
    signature_algorithm: str = "sha1"
    folder: str = DEFAULT_FOLDER  # root folder; "" puts request folders at the top

    def sdk_options(self) -> dict[str, Any]:
        """Every option the upload call reads, explicit, so the SDK's global config (which it
        fills from the environment at import time) plays no part."""
        return {
            "cloud_name": self.cloud_name,
            "api_key": self.api_key,
            "api_secret": self.api_secret,
            "upload_prefix": self.upload_prefix,
            "signature_algorithm": self.signature_algorithm,
            "signature_version": 2,
            "oauth_token": None,  # sign with key and secret, never a stray global token
            "upload_preset": None,
        }

    def redact(self, text: str) -> str:
        return text.replace(self.api_secret, "***") if self.api_secret else text


def parse_cloudinary_url(url: str, folder: str = DEFAULT_FOLDER) -> CloudinaryConfig:
    """Check CLOUDINARY_URL (the SDK's cloudinary://key:secret@cloud[?upload_prefix=...]).

    Raises CloudinaryConfigError naming what is wrong; the message never holds the secret."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port  # a port that is not a number raises here
    except ValueError:
        message = f"CLOUDINARY_URL cannot be parsed; expected {URL_SHAPE}"
        raise CloudinaryConfigError(message) from None
    if parts.scheme.lower() != "cloudinary":
        raise CloudinaryConfigError(f"CLOUDINARY_URL must start with cloudinary://: {URL_SHAPE}")
    missing = [
        name
        for name, value in (
            ("API key", parts.username),
            ("API secret", parts.password),
            ("cloud name", parts.hostname),
        )
        if not value
    ]
    if missing:
        raise CloudinaryConfigError(
            f"CLOUDINARY_URL has no {' and no '.join(missing)}; expected {URL_SHAPE}"
        )
    assert parts.username and parts.password and parts.hostname
    if port is not None or not _CLOUD_NAME.match(parts.hostname):
        raise CloudinaryConfigError(
            f"CLOUDINARY_URL: {parts.hostname!r} is not a cloud name; expected {URL_SHAPE}"
        )
    options = {key: values[-1] for key, values in parse_qs(parts.query).items()}
    if ignored := sorted(set(options) - set(URL_OPTIONS)):
        log.warning("CLOUDINARY_URL: ignoring %s (imgpipe uses %s)", ignored, list(URL_OPTIONS))
    algorithm = options.get("signature_algorithm", "sha1").lower()
    if algorithm not in SIGNATURE_ALGORITHMS:
        raise CloudinaryConfigError(
            f"CLOUDINARY_URL: signature_algorithm must be one of {', '.join(SIGNATURE_ALGORITHMS)}"
        )
    return CloudinaryConfig(
        cloud_name=parts.hostname,
        api_key=parts.username,
        api_secret=parts.password,
        upload_prefix=_upload_prefix(options.get("upload_prefix")),
        signature_algorithm=algorithm,
        folder=_root_folder(folder),
    )


def _upload_prefix(value: str | None) -> str:
    if value is None:
        return DEFAULT_API
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.username:
        raise CloudinaryConfigError(
            f"CLOUDINARY_URL: upload_prefix must be an http(s) base URL, got {value!r}"
        )
    return value.rstrip("/")


def _root_folder(value: str) -> str:
    folder = value.strip().strip("/")
    if folder and not _FOLDER.match(folder):
        raise CloudinaryConfigError(
            f"CLOUDINARY_FOLDER {value!r}: use letters, digits, '_' and '-', with '/' between"
        )
    return folder


@dataclass(frozen=True)
class _Failure:
    message: str
    transient: bool
    retry_after: float | None = None


class CloudinaryStorage:
    """Uploads to `<folder>/<request_id>/<image_key>`: the same image always gets the same
    public_id, and `overwrite=True` makes a retried or redelivered upload replace it."""

    def __init__(
        self,
        config: CloudinaryConfig,
        *,
        threads: int = 4,
        attempts: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 8.0,
        max_retry_after: float = 60.0,
        timeout: float = 60.0,
    ) -> None:
        self.config = config
        self.attempts = attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_retry_after = max_retry_after
        self.timeout = timeout
        threads = max(1, min(threads, MAX_THREADS))
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="cloudinary")
        _install_response_tap()

    def __repr__(self) -> str:
        return f"CloudinaryStorage(cloud={self.config.cloud_name!r}, folder={self.config.folder!r})"

    async def aclose(self) -> None:
        """Let the uploads in flight end, and their threads with them."""
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)

    def names(self, request_id: str, image_key: str, fmt: str) -> tuple[str, str]:
        """(asset folder, public_id) for an image; StorageError for unsafe names."""
        request_folder, _ = object_name(request_id, image_key, fmt)
        folder = "/".join(part for part in (self.config.folder, request_folder) if part)
        return folder, f"{folder}/{image_key}"

    def shared_names(self, key: str, fmt: str) -> tuple[str, str]:
        """(asset folder, public_id) for a shared output: `<folder>/objects/<key>`."""
        shared_name(key, fmt)  # refuses a malformed key
        folder = "/".join(part for part in (self.config.folder, SHARED_FOLDER) if part)
        return folder, f"{folder}/{key}"

    async def save(self, request_id: str, image_key: str, data: bytes, fmt: str) -> StoredImage:
        folder, public_id = self.names(request_id, image_key, fmt)
        return await self._upload(data, folder, public_id, [request_id])

    async def save_shared(self, key: str, data: bytes, fmt: str) -> StoredImage:
        """No request's tag: deleting a request by its tag must not take a shared asset."""
        folder, public_id = self.shared_names(key, fmt)
        return await self._upload(data, folder, public_id, [])

    async def delete_shared(self, location: str) -> None:
        """Destroy the asset whose public_id save_shared returned."""
        prefix = "/".join(part for part in (self.config.folder, SHARED_FOLDER) if part) + "/"
        if not location.startswith(prefix):
            raise StorageError(f"not a shared output: {location!r}")
        shared_name(location.removeprefix(prefix), "jpeg")  # refuses anything but a hex key
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._destroy, location)

    def _destroy(self, public_id: str) -> None:
        import cloudinary.exceptions
        import cloudinary.uploader

        try:
            cloudinary.uploader.destroy(
                public_id, resource_type="image", invalidate=True, **self.config.sdk_options()
            )
        except cloudinary.exceptions.Error as exc:
            raise StorageError(self.config.redact(str(exc))[:_MESSAGE_LIMIT]) from exc

    async def _upload(
        self, data: bytes, folder: str, public_id: str, tags: list[str]
    ) -> StoredImage:
        loop = asyncio.get_running_loop()
        for attempt in range(1, self.attempts + 1):
            answer = await loop.run_in_executor(
                self._executor, self._upload_once, data, folder, public_id, tags
            )
            if isinstance(answer, StoredImage):
                return answer
            delay = self._delay(attempt, answer.retry_after)
            if not answer.transient or attempt == self.attempts or delay is None:
                message = answer.message
                if answer.transient and delay is None:
                    message += (
                        f"; Cloudinary asks to retry after {answer.retry_after:.0f}s, longer "
                        f"than imgpipe waits ({self.max_retry_after:.0f}s)"
                    )
                elif answer.transient:
                    message += f"; gave up after {attempt} attempts"
                log.warning("cloudinary upload of %s failed: %s", public_id, message)
                raise StorageError(message)
            log.warning(
                "cloudinary upload of %s: %s; retrying in %.1fs (attempt %d of %d)",
                public_id,
                answer.message,
                delay,
                attempt + 1,
                self.attempts,
            )
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def delete_request(self, request_id: str) -> None:
        """Delete the request's assets: every upload is tagged with its request id."""
        object_name(request_id, "0-0", "jpeg")  # refuses an unsafe id
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._delete_tagged, request_id)

    def _delete_tagged(self, tag: str) -> None:
        import cloudinary.api
        import cloudinary.exceptions

        try:
            # The Admin API deletes up to 1,000 assets a call and says `partial` if more.
            while cloudinary.api.delete_resources_by_tag(tag, **self.config.sdk_options()).get(
                "partial"
            ):
                pass
        except cloudinary.exceptions.Error as exc:
            raise StorageError(self.config.redact(str(exc))[:_MESSAGE_LIMIT]) from exc

    def _delay(self, attempt: int, retry_after: float | None) -> float | None:
        """Seconds before the next attempt; None when Retry-After asks for more than we wait."""
        if retry_after is not None:
            return retry_after if retry_after <= self.max_retry_after else None
        # Exponential backoff with jitter, so many images retrying do not return in step.
        return min(self.max_backoff, self.backoff * 2 ** (attempt - 1)) * random.uniform(0.5, 1)

    def _upload_once(
        self, data: bytes, folder: str, public_id: str, tags: list[str]
    ) -> StoredImage | _Failure:
        """One upload attempt, in a pool thread. Returns a failure rather than raising it."""
        # Imported late: importing the SDK parses the CLOUDINARY_URL environment variable and
        # raises on a bad one, which would pre-empt parse_cloudinary_url's clearer message.
        import cloudinary.exceptions
        import cloudinary.uploader

        _tap.status = None
        _tap.retry_after = None
        try:
            result = cloudinary.uploader.upload(
                data,
                public_id=public_id,
                asset_folder=folder,  # dynamic folder mode; fixed mode derives it from the id
                overwrite=True,
                unique_filename=False,
                use_filename=False,
                resource_type="image",
                tags=tags,
                timeout=self.timeout,
                **self.config.sdk_options(),
            )
        except cloudinary.exceptions.Error as exc:
            return _classify(_tap.status, self.config.redact(str(exc))[:_MESSAGE_LIMIT])
        except ValueError as exc:  # the SDK refusing its options: not worth a retry
            return _Failure(f"Cloudinary SDK: {self.config.redact(str(exc))}", transient=False)
        if not isinstance(result, dict):
            return _Failure("Cloudinary's answer is not an upload result", transient=False)
        return self._stored(result, len(data))

    def _stored(self, result: dict[str, Any], size: int) -> StoredImage | _Failure:
        try:
            details: dict[str, Any] = {
                "backend": "cloudinary",
                "secure_url": str(result["secure_url"]),
                "public_id": str(result["public_id"]),
                "version": result.get("version"),
                "bytes": int(result.get("bytes", size)),
                "format": result.get("format"),
                "width": result.get("width"),
                "height": result.get("height"),
            }
        except (KeyError, TypeError, ValueError):
            return _Failure(
                f"Cloudinary's answer has no secure_url or public_id (keys: {sorted(result)})",
                transient=False,
            )
        return StoredImage(
            url=details["secure_url"],
            location=details["public_id"],
            size=details["bytes"],
            details=details,
        )


def _classify(status: int | None, message: str) -> _Failure:
    retry_after = parse_retry_after(_tap.retry_after)
    if status is None:
        return _Failure(f"cannot reach Cloudinary: {message}", transient=True)
    if status in (401, 403):
        return _Failure(
            f"Cloudinary refused the credentials (HTTP {status}): check the API key and "
            f"secret in CLOUDINARY_URL ({message})",
            transient=False,
        )
    if status in (420, 429):
        return _Failure(f"Cloudinary rate limit (HTTP {status}): {message}", True, retry_after)
    if status >= 500:
        return _Failure(f"Cloudinary error (HTTP {status}): {message}", True, retry_after)
    return _Failure(f"Cloudinary refused the upload (HTTP {status}): {message}", transient=False)


# The SDK raises on an error answer without its status or headers, and Retry-After lives in
# the headers. A thin wrapper around the SDK's connection pool (`cloudinary.uploader._http`,
# the one it posts uploads through) notes both for the thread that made the request (each
# attempt runs start to end in one pool thread). It leans on a private name of the SDK: the
# pin in pyproject.toml keeps the major version, and `_install_response_tap` refuses to
# start, saying why, if that name is gone or no longer a connection pool.


class _ResponseTap(threading.local):
    status: int | None = None
    retry_after: str | None = None


_tap = _ResponseTap()
_install_lock = threading.Lock()


class _TappedHttp:
    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def request(self, *args: Any, **kwargs: Any) -> Any:
        response = self.inner.request(*args, **kwargs)
        _tap.status = response.status
        _tap.retry_after = response.headers.get("Retry-After")
        return response

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _install_response_tap() -> None:
    import cloudinary
    import cloudinary.uploader
    import cloudinary.utils

    with _install_lock:
        current = getattr(cloudinary.uploader, "_http", None)
        if isinstance(current, _TappedHttp):
            return
        if not callable(getattr(current, "request", None)):
            raise CloudinaryConfigError(
                f"this cloudinary SDK ({cloudinary.VERSION}) no longer posts uploads through "
                "cloudinary.uploader._http, which imgpipe wraps to read error statuses and "
                "Retry-After: use the version pinned in imgpipe-processor's pyproject.toml"
            )
        pool = cloudinary.utils.get_http_connector(
            cloudinary.config(), {**cloudinary.CERT_KWARGS, "maxsize": MAX_THREADS}
        )
        cloudinary.uploader._http = _TappedHttp(pool)
