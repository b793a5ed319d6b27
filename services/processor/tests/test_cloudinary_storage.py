"""CloudinaryStorage through the official SDK against a loopback Cloudinary: signing, folders,
overwrite, retries, credentials, and CLOUDINARY_URL checked at start-up."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from imgpipe.contracts.events import Options
from imgpipe.contracts.settings import Settings
from imgpipe.processor.adapters.cloudinary_storage import (
    CloudinaryConfigError,
    CloudinaryStorage,
    parse_cloudinary_url,
)
from imgpipe.processor.adapters.storage import LocalStorage, StorageError
from imgpipe.processor.bootstrap import build_storage
from imgpipe.processor.compress import compress
from tests.support.fake_cloudinary import Failure, FakeCloudinary, fake_cloudinary, parse_form
from tests.support.http_server import loopback_server
from tests.support.images import jpeg_bytes, png_with_alpha_bytes


@pytest.fixture
def cloud() -> Iterator[FakeCloudinary]:
    with fake_cloudinary() as fake:
        yield fake


def storage_for(url: str, **kwargs: float) -> CloudinaryStorage:
    """Short backoff: these tests are about what is retried, not how long it waits."""
    return CloudinaryStorage(parse_cloudinary_url(url), **{"backoff": 0.01, **kwargs})


def sent_fields(fake: FakeCloudinary, index: int = -1) -> dict[str, str]:
    request = fake.uploads[index]
    return parse_form(request.headers["Content-Type"], request.body)[0]


async def test_upload_lands_in_the_request_folder_and_returns_the_secure_url(cloud) -> None:
    data = jpeg_bytes(320, 200, seed=1)
    stored = await storage_for(cloud.cloudinary_url()).save("req1", "2-0", data, "jpeg")

    asset = cloud.assets["imgpipe/req1/2-0"]
    assert asset.data == data
    assert asset.tags == ["req1"]
    assert asset.asset_folder == "imgpipe/req1"
    assert stored.url == asset.secure_url(cloud.cloud_name)
    assert stored.url.startswith("https://res.cloudinary.com/imgpipe-test/image/upload/v")
    assert stored.location == "imgpipe/req1/2-0"
    assert stored.size == len(data)
    assert stored.details == {
        "backend": "cloudinary",
        "secure_url": stored.url,
        "public_id": "imgpipe/req1/2-0",
        "version": asset.version,
        "bytes": len(data),
        "format": "jpg",
        "width": 320,
        "height": 200,
    }
    # Signed (the fake refuses anything else) and asking for a replace, never a copy.
    fields = sent_fields(cloud)
    assert fields["api_key"] == cloud.api_key and fields["signature"]
    assert fields["overwrite"] == "1" and fields["unique_filename"] == "0"
    assert cloud.uploads[0].path == "/v1_1/imgpipe-test/image/upload"  # resource_type image


async def test_the_same_image_stored_twice_replaces_one_public_id(cloud) -> None:
    """A redelivered job uploads again: one asset, newer version, newer bytes."""
    storage = storage_for(cloud.cloudinary_url())
    first = await storage.save("req1", "0-1", jpeg_bytes(200, 100, seed=1), "jpeg")
    second = await storage.save("req1", "0-1", png_with_alpha_bytes(200, 100, seed=2), "webp")

    assert list(cloud.assets) == ["imgpipe/req1/0-1"]
    asset = cloud.assets["imgpipe/req1/0-1"]
    assert asset.uploads == 2 and asset.format == "png"
    assert second.details["version"] > first.details["version"]
    assert second.url == asset.secure_url(cloud.cloud_name) != first.url


async def test_a_lost_response_is_retried_and_overwrites(cloud) -> None:
    """Cloudinary stored the upload but the answer was a 500: the retry replaces it."""
    cloud.fail_next(Failure(500, "Internal error", store_first=True))
    stored = await storage_for(cloud.cloudinary_url()).save("req1", "0-0", jpeg_bytes(), "jpeg")

    assert len(cloud.uploads) == 2
    assert list(cloud.assets) == ["imgpipe/req1/0-0"]
    assert cloud.assets["imgpipe/req1/0-0"].uploads == 2
    assert stored.url == cloud.assets["imgpipe/req1/0-0"].secure_url(cloud.cloud_name)


async def test_server_errors_are_retried_until_an_upload_succeeds(cloud) -> None:
    cloud.fail_next(
        Failure(500, "General error"),
        Failure(502, body=b"<html><h1>502 Bad Gateway</h1></html>"),
        Failure(503, "Service unavailable"),
    )
    stored = await storage_for(cloud.cloudinary_url()).save("req1", "0-0", jpeg_bytes(), "jpeg")

    assert len(cloud.uploads) == 4
    assert stored.url == cloud.assets["imgpipe/req1/0-0"].secure_url(cloud.cloud_name)


async def test_rate_limit_waits_as_long_as_retry_after_says(cloud) -> None:
    cloud.fail_next(Failure(429, "Rate limit exceeded", headers={"Retry-After": "1"}))
    stored = await storage_for(cloud.cloudinary_url()).save("req1", "0-0", jpeg_bytes(), "jpeg")

    first, second = cloud.uploads
    assert second.at - first.at >= 0.95  # backoff alone would have waited ~0.01 s
    assert stored.url == cloud.assets["imgpipe/req1/0-0"].secure_url(cloud.cloud_name)


async def test_a_retry_after_longer_than_imgpipe_waits_fails_the_image_at_once(cloud) -> None:
    cloud.fail_next(Failure(429, "Rate limit exceeded", headers={"Retry-After": "3600"}))
    too_long = r"HTTP 429.*retry after 3600s, longer than imgpipe waits"
    with pytest.raises(StorageError, match=too_long):
        await storage_for(cloud.cloudinary_url()).save("req1", "0-0", jpeg_bytes(), "jpeg")
    assert len(cloud.uploads) == 1 and not cloud.assets


async def test_persistent_server_errors_give_up_after_the_last_attempt(cloud) -> None:
    cloud.fail_next(*[Failure(503, "Service unavailable")] * 3)
    storage = storage_for(cloud.cloudinary_url(), attempts=3)
    with pytest.raises(StorageError, match=r"HTTP 503.*gave up after 3 attempts"):
        await storage.save("req1", "0-0", jpeg_bytes(), "jpeg")
    assert len(cloud.uploads) == 3 and not cloud.assets


async def test_wrong_secret_fails_fast_with_a_clear_message_that_hides_it(cloud, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "not-the-secret-Zq81x"
    storage = storage_for(cloud.cloudinary_url(api_secret=wrong))
    with pytest.raises(StorageError) as failure:
        await storage.save("req1", "0-0", jpeg_bytes(), "jpeg")

    message = str(failure.value)
    assert "refused the credentials (HTTP 401)" in message
    assert "check the API key and secret in CLOUDINARY_URL" in message
    assert "Invalid Signature" in message  # Cloudinary's own words follow
    assert len(cloud.uploads) == 1  # no retry can fix a wrong secret
    assert not cloud.assets
    assert wrong not in message and wrong not in caplog.text and wrong not in repr(storage)


async def test_unknown_api_key_is_a_credentials_failure(cloud) -> None:
    storage = storage_for(cloud.cloudinary_url(api_key="999"))
    with pytest.raises(StorageError, match=r"refused the credentials.*Unknown API key"):
        await storage.save("req1", "0-0", jpeg_bytes(), "jpeg")


async def test_a_cloudinary_that_cannot_be_reached_is_retried_then_fails() -> None:
    with loopback_server() as server:
        closed = server.base_url
    storage = storage_for(f"cloudinary://key:secret@cloud?upload_prefix={closed}", attempts=2)
    with pytest.raises(StorageError, match=r"cannot reach Cloudinary.*gave up after 2 attempts"):
        await storage.save("req1", "0-0", jpeg_bytes(), "jpeg")


async def test_a_sha256_signing_cloud_works_through_the_url_setting() -> None:
    with fake_cloudinary(signature_algorithm="sha256") as cloud:
        url = cloud.cloudinary_url() + "&signature_algorithm=sha256"
        stored = await storage_for(url).save("req1", "0-0", jpeg_bytes(), "jpeg")
        assert stored.location in cloud.assets
        assert len(sent_fields(cloud)["signature"]) == 64


async def test_unsafe_names_never_reach_cloudinary(cloud) -> None:
    with pytest.raises(StorageError, match="unsafe"):
        await storage_for(cloud.cloudinary_url()).save("../x", "0-0", b"x", "jpeg")
    assert not cloud.uploads


# Configuration ------------------------------------------------------------------------


def test_cloudinary_url_parsed_like_the_sdk_does() -> None:
    config = parse_cloudinary_url(
        "cloudinary://614335564976464:s3cr3t-Value_x@my-cloud?upload_prefix=http://127.0.0.1:9/",
        folder="/shop/images/",
    )
    assert (config.cloud_name, config.api_key, config.api_secret) == (
        "my-cloud",
        "614335564976464",
        "s3cr3t-Value_x",
    )
    assert config.upload_prefix == "http://127.0.0.1:9"
    assert config.folder == "shop/images"
    assert "s3cr3t" not in repr(config)
    plain = parse_cloudinary_url("cloudinary://k:s@c")
    assert plain.upload_prefix == "https://api.cloudinary.com" and plain.folder == "imgpipe"


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("https://key:topsecret@cloud", "must start with cloudinary://"),
        ("topsecret", "must start with cloudinary://"),
        ("cloudinary://key@cloud", "no API secret"),
        ("cloudinary://:topsecret@cloud", "no API key"),
        ("cloudinary://key:topsecret@", "no cloud name"),
        ("cloudinary://", "no API key and no API secret and no cloud name"),
        ("cloudinary://key:topsecret@cloud:notaport", "cannot be parsed"),
        ("cloudinary://key:topsecret@bad_cloud!", "is not a cloud name"),
        ("cloudinary://key:topsecret@cloud?upload_prefix=ftp://x", "upload_prefix must be"),
        ("cloudinary://key:topsecret@cloud?signature_algorithm=md5", "signature_algorithm"),
    ],
)
def test_a_misconfigured_cloudinary_url_is_refused_at_start_up(
    tmp_path: Path, url: str, complaint: str
) -> None:
    settings = Settings(IMGPIPE_DATA_DIR=tmp_path, cloudinary_url=url)
    with pytest.raises(CloudinaryConfigError, match=complaint) as refused:
        build_storage(settings)
    assert "topsecret" not in str(refused.value)
    assert "CLOUDINARY_URL" in str(refused.value)


def test_a_bad_root_folder_is_refused_at_start_up(tmp_path: Path) -> None:
    settings = Settings(
        IMGPIPE_DATA_DIR=tmp_path, cloudinary_url="cloudinary://k:s@c", CLOUDINARY_FOLDER="a/../b"
    )
    with pytest.raises(CloudinaryConfigError, match="CLOUDINARY_FOLDER"):
        build_storage(settings)


def test_cloudinary_url_in_the_environment_switches_the_backend(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CLOUDINARY_URL", "cloudinary://key:secret@shop-cloud")
    monkeypatch.setenv("CLOUDINARY_FOLDER", "catalogue")
    storage = build_storage(Settings(IMGPIPE_DATA_DIR=tmp_path))
    assert isinstance(storage, CloudinaryStorage)
    assert storage.config.cloud_name == "shop-cloud" and storage.config.folder == "catalogue"
    assert storage.names("req1", "3-1", "jpeg") == ("catalogue/req1", "catalogue/req1/3-1")

    monkeypatch.setenv("CLOUDINARY_URL", "")  # set but empty, as compose files do: local
    assert isinstance(build_storage(Settings(IMGPIPE_DATA_DIR=tmp_path)), LocalStorage)


def test_an_sdk_without_the_wrapped_pool_is_refused_at_start(monkeypatch) -> None:
    import cloudinary.uploader

    from imgpipe.processor.adapters import cloudinary_storage

    monkeypatch.setattr(cloudinary.uploader, "_http", None)
    with pytest.raises(cloudinary_storage.CloudinaryConfigError, match="_http"):
        cloudinary_storage._install_response_tap()


@pytest.mark.parametrize(
    ("fmt", "cloudinary_format"), [("jpeg", "jpg"), ("webp", "webp"), ("avif", "avif")]
)
async def test_every_output_format_is_uploaded(cloud, fmt: str, cloudinary_format: str) -> None:
    data = compress(jpeg_bytes(160, 120), Options(format=fmt), 50_000_000).data  # type: ignore[arg-type]
    stored = await storage_for(cloud.cloudinary_url()).save("req1", "0-0", data, fmt)
    assert cloud.assets["imgpipe/req1/0-0"].data == data
    assert stored.details and stored.details["format"] == cloudinary_format
    assert stored.url.endswith(f".{cloudinary_format}")


async def test_a_shared_output_is_untagged_under_objects_and_destroyed_by_its_public_id(
    cloud,
) -> None:
    storage = storage_for(cloud.cloudinary_url())
    key = "c0ffee" * 10 + "abcd"
    data = jpeg_bytes(120, 80, seed=3)
    stored = await storage.save_shared(key, data, "jpeg")

    asset = cloud.assets[f"imgpipe/objects/{key}"]
    assert asset.data == data and asset.tags == [] and asset.asset_folder == "imgpipe/objects"
    assert stored.location == f"imgpipe/objects/{key}"
    assert stored.url == asset.secure_url(cloud.cloud_name)
    # Deleting a request by its tag leaves shared assets alone (they carry none).
    other = await storage.save("req9", "0-0", data, "jpeg")
    assert set(cloud.assets) == {stored.location, other.location}

    await storage.delete_shared(stored.location)
    await storage.delete_shared(stored.location)  # gone already: not an error
    assert set(cloud.assets) == {other.location}
    with pytest.raises(StorageError, match="not a shared output"):
        await storage.delete_shared(other.location)
    with pytest.raises(StorageError):
        await storage.save_shared("../not-a-key", data, "jpeg")
