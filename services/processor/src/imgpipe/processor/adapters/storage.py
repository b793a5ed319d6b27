"""Where output images go. The backend is chosen once, in bootstrap.build_storage.

Outputs are shared: stored under a name made of their input's hash and the options
(`objects/<key>.<ext>`), so several requests can point at one file, and deleted only
when no request uses them any more (docs/architecture.md, "Reusing outputs"). Outputs
stored before, and the rare one written while its shared name was being deleted, are
per request (`<request_id>/<image_key>.<ext>`) and go with their request."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

EXTENSIONS = {"jpeg": "jpg", "webp": "webp", "avif": "avif"}
# Request ids and image keys become path parts and URL segments: keep them boring.
_SAFE_PART = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")
# The folder of shared outputs; no request id has this shape (they are UUID hex).
SHARED_FOLDER = "objects"
_SHARED_NAME = re.compile(r"^[0-9a-f]{64}$")


class StorageError(Exception):
    """The image could not be stored; the image fails with `storage_failed`."""


@dataclass(frozen=True)
class StoredImage:
    url: str  # the public output URL
    location: str  # backend-specific: a file path, a public_id, ...
    size: int
    # What the backend knows about the stored object (Cloudinary: public_id, version, ...);
    # the handler keeps it on the image record. None: nothing beyond the fields above.
    details: dict[str, Any] | None = None


class Storage(Protocol):
    async def save(self, request_id: str, image_key: str, data: bytes, fmt: str) -> StoredImage:
        """Store (or overwrite: a retry must not duplicate) one output image."""
        ...

    async def delete_request(self, request_id: str) -> None:
        """Delete every stored image of the request (nothing stored is not an error)."""
        ...

    async def save_shared(self, key: str, data: bytes, fmt: str) -> StoredImage:
        """Store (or overwrite) the output named `key` (a hex SHA-256 of its input and
        options), which any number of requests may use."""
        ...

    async def delete_shared(self, location: str) -> None:
        """Delete a shared output by the `location` save_shared gave (gone already is
        not an error)."""
        ...

    async def aclose(self) -> None:
        """Release what the backend holds (threads, connections)."""
        ...


def object_name(request_id: str, image_key: str, fmt: str) -> tuple[str, str]:
    """(folder, file name) for an image; raises StorageError for unsafe names or formats."""
    if not (_SAFE_PART.match(request_id) and _SAFE_PART.match(image_key)):
        raise StorageError(f"unsafe request id or image key: {request_id!r}, {image_key!r}")
    if fmt not in EXTENSIONS:
        raise StorageError(f"unknown output format {fmt!r}")
    return request_id, f"{image_key}.{EXTENSIONS[fmt]}"


def shared_name(key: str, fmt: str) -> str:
    """`objects/<key>.<ext>` for a shared output; StorageError for a malformed key."""
    if not _SHARED_NAME.match(key):
        raise StorageError(f"not a shared output key: {key!r}")
    if fmt not in EXTENSIONS:
        raise StorageError(f"unknown output format {fmt!r}")
    return f"{SHARED_FOLDER}/{key}.{EXTENSIONS[fmt]}"


class LocalStorage:
    """Files under `root/<request_id>/`, served by the status service under `base_url`."""

    def __init__(self, root: Path, base_url: str) -> None:
        self.root = root
        self.base_url = base_url.rstrip("/")

    async def save(self, request_id: str, image_key: str, data: bytes, fmt: str) -> StoredImage:
        folder, name = object_name(request_id, image_key, fmt)
        path = self.root / folder / name
        try:
            await asyncio.to_thread(_write_atomically, path, data)
        except OSError as exc:
            raise StorageError(f"cannot write {path}: {exc}") from exc
        return StoredImage(
            url=f"{self.base_url}/{folder}/{name}", location=str(path), size=len(data)
        )

    async def delete_request(self, request_id: str) -> None:
        folder, _ = object_name(request_id, "0-0", "jpeg")
        try:
            await asyncio.to_thread(shutil.rmtree, self.root / folder, ignore_errors=False)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StorageError(f"cannot delete {self.root / folder}: {exc}") from exc

    async def save_shared(self, key: str, data: bytes, fmt: str) -> StoredImage:
        name = shared_name(key, fmt)
        path = self.root / name
        try:
            await asyncio.to_thread(_write_atomically, path, data)
        except OSError as exc:
            raise StorageError(f"cannot write {path}: {exc}") from exc
        # Relative to the media root: the location names the file wherever the root moves.
        return StoredImage(url=f"{self.base_url}/{name}", location=name, size=len(data))

    async def delete_shared(self, location: str) -> None:
        folder, _, file_name = location.partition("/")
        key, _, extension = file_name.partition(".")
        if folder != SHARED_FOLDER or extension not in EXTENSIONS.values():
            raise StorageError(f"not a shared output: {location!r}")
        shared_name(key, "jpeg")  # refuses anything but a hex key
        try:
            await asyncio.to_thread((self.root / location).unlink, missing_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot delete {self.root / location}: {exc}") from exc

    async def aclose(self) -> None:
        """Nothing to release: each write is a thread of asyncio's own pool."""


def _write_atomically(path: Path, data: bytes) -> None:
    """Readers see the old file or the new one, never half of one; a retry overwrites."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
