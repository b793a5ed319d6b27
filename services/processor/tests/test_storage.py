"""LocalStorage: atomic files under the media dir, URLs under the public media base."""

from __future__ import annotations

from pathlib import Path

import pytest

from imgpipe.contracts.settings import Settings
from imgpipe.processor.adapters.cloudinary_storage import CloudinaryConfigError, CloudinaryStorage
from imgpipe.processor.adapters.storage import LocalStorage, StorageError
from imgpipe.processor.bootstrap import build_storage


async def test_saves_a_file_and_returns_its_public_url(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "media", "http://cdn.example/media/")
    stored = await storage.save("req1", "0-1", b"jpeg bytes", "jpeg")
    assert stored.url == "http://cdn.example/media/req1/0-1.jpg"
    assert (tmp_path / "media" / "req1" / "0-1.jpg").read_bytes() == b"jpeg bytes"
    assert stored.size == len(b"jpeg bytes")


async def test_a_retry_overwrites_instead_of_duplicating(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path, "http://x/media")
    await storage.save("req1", "2-0", b"first", "webp")
    await storage.save("req1", "2-0", b"second", "webp")
    assert [p.name for p in (tmp_path / "req1").iterdir()] == ["2-0.webp"]
    assert (tmp_path / "req1" / "2-0.webp").read_bytes() == b"second"


@pytest.mark.parametrize(("request_id", "key"), [("../etc", "0-0"), ("req", "a/b"), (".", "0-0")])
async def test_unsafe_names_are_refused(tmp_path: Path, request_id: str, key: str) -> None:
    with pytest.raises(StorageError):
        await LocalStorage(tmp_path, "http://x/media").save(request_id, key, b"x", "jpeg")


async def test_unwritable_directory_is_a_storage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StorageError):
        await LocalStorage(blocker, "http://x/media").save("req", "0-0", b"x", "jpeg")


def test_default_backend_is_local_under_the_data_dir(tmp_path: Path) -> None:
    settings = Settings(IMGPIPE_DATA_DIR=tmp_path, public_base_url="http://files.example")
    storage = build_storage(settings)
    assert isinstance(storage, LocalStorage)
    assert storage.root == tmp_path / "media"
    assert storage.base_url == "http://files.example/media"


@pytest.mark.parametrize(
    ("fmt", "name"), [("jpeg", "0-0.jpg"), ("webp", "0-0.webp"), ("avif", "0-0.avif")]
)
async def test_the_file_name_has_the_format_s_extension(
    tmp_path: Path, fmt: str, name: str
) -> None:
    stored = await LocalStorage(tmp_path, "http://cdn.example/media").save("r", "0-0", b"x", fmt)
    assert stored.url == f"http://cdn.example/media/r/{name}"
    assert (tmp_path / "r" / name).read_bytes() == b"x"


def test_local_storage_is_refused_when_shared_storage_is_required(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The Kubernetes manifests set it: processors on several machines cannot share a disk.
    monkeypatch.setenv("IMGPIPE_REQUIRE_SHARED_STORAGE", "true")
    monkeypatch.delenv("CLOUDINARY_URL", raising=False)
    with pytest.raises(CloudinaryConfigError) as refused:
        build_storage(Settings(IMGPIPE_DATA_DIR=tmp_path))
    message = str(refused.value)
    assert "IMGPIPE_REQUIRE_SHARED_STORAGE" in message and "CLOUDINARY_URL" in message
    assert not (tmp_path / "media").exists()


def test_cloudinary_satisfies_the_shared_storage_requirement(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMGPIPE_REQUIRE_SHARED_STORAGE", "true")
    monkeypatch.setenv("CLOUDINARY_URL", "cloudinary://key:secret@shop-cloud")
    assert isinstance(build_storage(Settings(IMGPIPE_DATA_DIR=tmp_path)), CloudinaryStorage)


async def test_shared_outputs_are_named_by_key_and_only_they_can_be_deleted_by_location(
    tmp_path: Path,
) -> None:
    storage = LocalStorage(tmp_path, "http://127.0.0.1:8002/media")
    key = "ab" * 32
    stored = await storage.save_shared(key, b"webp bytes", "webp")
    assert stored.location == f"objects/{key}.webp"
    assert stored.url == f"http://127.0.0.1:8002/media/objects/{key}.webp"
    assert (tmp_path / stored.location).read_bytes() == b"webp bytes"

    for location in ("objects/../secret.jpg", f"req/{key}.jpg", "objects/abc.jpg", "/etc/x"):
        with pytest.raises(StorageError):
            await storage.delete_shared(location)
    await storage.delete_shared(stored.location)
    await storage.delete_shared(stored.location)  # gone already: not an error
    assert list((tmp_path / "objects").iterdir()) == []
    with pytest.raises(StorageError):
        await storage.save_shared("../../etc/passwd", b"x", "jpeg")
