"""A loopback stand-in for Cloudinary's Upload API, for tests that use the official SDK.

Point the SDK at it with its `upload_prefix` setting (`FakeCloudinary.cloudinary_url()` puts
it in CLOUDINARY_URL). It checks each upload the way Cloudinary does (known api_key, fresh
timestamp, signature = hex digest of the sorted `key=value&...` parameters followed by the
API secret) and answers with Cloudinary's response shape. Assets are kept by public_id, so a
test can see an overwrite; every request, good or bad, is recorded on `server`.
"""

from __future__ import annotations

import email.policy
import hashlib
import io
import itertools
import json
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.parser import BytesParser

from PIL import Image

from tests.support.http_server import LoopbackServer, Recorded, Response

# Never signed (Cloudinary's rule): the file itself, who signs, where it goes, the signature.
UNSIGNED = {"file", "api_key", "resource_type", "cloud_name", "signature"}
STALE_AFTER = 3600  # seconds: Cloudinary refuses older timestamps
FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "AVIF": "avif"}


@dataclass
class Asset:
    public_id: str
    data: bytes
    version: int
    format: str
    width: int
    height: int
    tags: list[str]
    asset_folder: str
    uploads: int = 1  # how many uploads wrote this public_id

    def secure_url(self, cloud_name: str) -> str:
        return (
            f"https://res.cloudinary.com/{cloud_name}/image/upload/"
            f"v{self.version}/{self.public_id}.{self.format}"
        )


@dataclass
class Failure:
    """A canned answer for the next upload instead of the real thing."""

    status: int
    message: str = "Server error"
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None  # raw body (say an HTML error page) instead of the JSON error
    store_first: bool = False  # store the upload, then answer this: a lost response


class FakeCloudinary:
    def __init__(
        self,
        cloud_name: str = "imgpipe-test",
        api_key: str = "614335564976464",
        api_secret: str = "fake-secret-3a7Ff0_Qv9",
        signature_algorithm: str = "sha1",
    ) -> None:
        self.cloud_name = cloud_name
        self.api_key = api_key
        self.api_secret = api_secret
        self.signature_algorithm = signature_algorithm
        self.assets: dict[str, Asset] = {}
        self.server = LoopbackServer()
        self.upload_path = f"/v1_1/{cloud_name}/image/upload"
        self.server.add(self.upload_path, self._upload)
        self.destroy_path = f"/v1_1/{cloud_name}/image/destroy"
        self.server.add(self.destroy_path, self._destroy)
        self._failures: deque[Failure] = deque()
        self._lock = threading.Lock()
        self._versions = itertools.count(int(time.time()))

    # Test-facing --------------------------------------------------------------------

    def cloudinary_url(self, api_secret: str | None = None, api_key: str | None = None) -> str:
        """CLOUDINARY_URL for this fake (the SDK's upload_prefix query parameter)."""
        key = api_key or self.api_key
        secret = api_secret or self.api_secret
        return f"cloudinary://{key}:{secret}@{self.cloud_name}?upload_prefix={self.server.base_url}"

    def fail_next(self, *failures: Failure) -> None:
        with self._lock:
            self._failures.extend(failures)

    @property
    def uploads(self) -> list[Recorded]:
        """Every upload request that reached the fake, in order, answered well or not."""
        return self.server.requests_to(self.upload_path)

    def start(self) -> FakeCloudinary:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    # The Upload API -----------------------------------------------------------------

    def _upload(self, request: Recorded) -> Response:
        fields, files = parse_form(request.headers.get("Content-Type", ""), request.body)
        with self._lock:
            failure = self._failures.popleft() if self._failures else None
        if failure and not failure.store_first:
            return _failure_response(failure)
        refused = self._check(fields, files)
        if refused:
            return refused
        try:
            asset = self._store(fields, files["file"])
        except OSError:
            return _error(400, "Invalid image file")
        if failure:
            return _failure_response(failure)
        return _json(200, self._result(asset, fields))

    def _destroy(self, request: Recorded) -> Response:
        """The Upload API's destroy: `{"result": "ok"}`, or "not found" for no such asset."""
        fields, _ = parse_form(request.headers.get("Content-Type", ""), request.body)
        refused = self._check(fields, {"file": b""})
        if refused:
            return refused
        with self._lock:
            found = self.assets.pop(fields.get("public_id", ""), None)
        return _json(200, {"result": "ok" if found else "not found"})

    def _check(self, fields: dict[str, str], files: dict[str, bytes]) -> Response | None:
        if fields.get("api_key") != self.api_key:
            return _error(401, f"Unknown API key {fields.get('api_key', '')}")
        to_sign = string_to_sign(fields)
        expected = hashlib.new(
            self.signature_algorithm, (to_sign + self.api_secret).encode()
        ).hexdigest()
        if fields.get("signature") != expected:
            signature = fields.get("signature", "")
            return _error(401, f"Invalid Signature {signature}. String to sign - '{to_sign}'.")
        timestamp = int(fields.get("timestamp") or 0)
        if abs(time.time() - timestamp) > STALE_AFTER:
            return _error(400, f"Stale request - reported time is {timestamp}")
        if "file" not in files:
            return _error(400, "Missing required parameter - file")
        return None

    def _store(self, fields: dict[str, str], data: bytes) -> Asset:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            fmt = FORMATS.get(image.format or "", (image.format or "bin").lower())
            width, height = image.size
        public_id = fields.get("public_id") or uuid.uuid4().hex[:20]
        if fields.get("folder"):  # fixed folder mode: the folder prefixes the public_id
            public_id = f"{fields['folder'].strip('/')}/{public_id}"
        with self._lock:
            existing = self.assets.get(public_id)
            if existing is not None and fields.get("overwrite") not in ("1", "true"):
                return existing  # Cloudinary keeps the old asset and says so
            asset = Asset(
                public_id=public_id,
                data=data,
                version=next(self._versions),
                format=fmt,
                width=width,
                height=height,
                tags=[t for t in fields.get("tags", "").split(",") if t],
                asset_folder=fields.get("asset_folder") or public_id.rpartition("/")[0],
                uploads=existing.uploads + 1 if existing else 1,
            )
            self.assets[public_id] = asset
        return asset

    def _result(self, asset: Asset, fields: dict[str, str]) -> dict[str, object]:
        secure_url = asset.secure_url(self.cloud_name)
        return {
            "asset_id": hashlib.md5(asset.public_id.encode()).hexdigest(),
            "public_id": asset.public_id,
            "version": asset.version,
            "version_id": hashlib.md5(f"{asset.public_id}{asset.version}".encode()).hexdigest(),
            "signature": hashlib.sha1(
                f"public_id={asset.public_id}&version={asset.version}{self.api_secret}".encode()
            ).hexdigest(),
            "width": asset.width,
            "height": asset.height,
            "format": asset.format,
            "resource_type": "image",
            "created_at": datetime.fromtimestamp(asset.version, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "tags": asset.tags,
            "bytes": len(asset.data),
            "type": "upload",
            "etag": hashlib.md5(asset.data).hexdigest(),
            "placeholder": False,
            "url": secure_url.replace("https://", "http://", 1),
            "secure_url": secure_url,
            "folder": asset.asset_folder,
            "asset_folder": asset.asset_folder,
            "display_name": asset.public_id.rpartition("/")[2],
            "overwritten": asset.uploads > 1,
            "original_filename": "file",
            "api_key": fields["api_key"],
        }


def string_to_sign(fields: dict[str, str]) -> str:
    """Cloudinary's string to sign: every signed, non-empty parameter as key=value, sorted,
    joined with '&' (an '&' inside a pair escaped as %26, signature version 2)."""
    pairs = [f"{k}={v}".replace("&", "%26") for k, v in fields.items() if k not in UNSIGNED and v]
    return "&".join(sorted(pairs))


def parse_form(content_type: str, body: bytes) -> tuple[dict[str, str], dict[str, bytes]]:
    """multipart/form-data as (fields, files); repeated `name[]` fields join with commas."""
    head = f"Content-Type: {content_type}\r\n\r\n".encode()
    message = BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    fields: dict[str, str] = {}
    files: dict[str, bytes] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True) or b""
        if part.get_filename() is not None:
            files[name] = payload
        elif name.endswith("[]"):
            key = name[:-2]
            fields[key] = f"{fields[key]},{payload.decode()}" if key in fields else payload.decode()
        else:
            fields[name] = payload.decode()
    return fields, files


def _json(status: int, body: object, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body).encode(), status, "application/json", headers or {})


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return _json(status, {"error": {"message": message}}, headers)


def _failure_response(failure: Failure) -> Response:
    if failure.body is not None:
        return Response(failure.body, failure.status, "text/html", failure.headers)
    return _error(failure.status, failure.message, failure.headers)


@contextmanager
def fake_cloudinary(**kwargs: str) -> Iterator[FakeCloudinary]:
    fake = FakeCloudinary(**kwargs).start()
    try:
        yield fake
    finally:
        fake.stop()
