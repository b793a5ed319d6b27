"""The processor storing in "Cloudinary" (the official SDK against a loopback Cloudinary),
end to end through the real broker and database, and on through the status service."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterator

import httpx
import pytest
from asgi_lifespan import LifespanManager
from pymongo import MongoClient

from imgpipe.contracts.events import ImageProcessed, RequestCompleted
from imgpipe.contracts.settings import Settings
from imgpipe.processor.adapters.cloudinary_storage import CloudinaryConfigError
from imgpipe.status.app import create_app as create_status_app
from tests.support.fake_cloudinary import Failure, FakeCloudinary, fake_cloudinary
from tests.support.http_server import LoopbackServer, Response
from tests.support.images import jpeg_bytes, png_with_alpha_bytes


@pytest.fixture
def cloud() -> Iterator[FakeCloudinary]:
    with fake_cloudinary() as fake:
        yield fake


def with_cloudinary(settings: Settings, url: str) -> Settings:
    return settings.model_copy(update={"cloudinary_url": url})


def serve(server: LoopbackServer, count: int) -> list[str]:
    urls = []
    for i in range(count):
        body, kind = (
            (png_with_alpha_bytes(seed=i), "image/png")
            if i == 1
            else (jpeg_bytes(480, 360, seed=i), "image/jpeg")
        )
        urls.append(server.add(f"/img/{i}", Response(body, content_type=kind)))
    return urls


def image_records(settings: Settings, request_id: str) -> dict[str, dict]:
    with MongoClient(settings.mongodb_url) as client:
        images = client[settings.database_name("processor")].images
        return {doc["image_key"]: doc for doc in images.find({"request_id": request_id})}


async def status_of(http: httpx.AsyncClient, request_id: str) -> dict:
    """GET /status until the read model has the completed request (it follows the events)."""
    for _ in range(600):
        response = await http.get(f"/status/{request_id}")
        if response.status_code == 200 and response.json()["status"] in ("completed", "error"):
            return response.json()
        await asyncio.sleep(0.1)
    raise AssertionError(f"status never completed: {response.status_code} {response.text}")


async def test_a_request_is_stored_in_cloudinary_end_to_end(
    processor_settings, cloud, image_server, tap, run_processor, make_request
) -> None:
    settings = with_cloudinary(processor_settings, cloud.cloudinary_url())
    urls = [*serve(image_server, 4), image_server.url("/img/missing")]
    request_id = uuid.uuid4().hex
    # The first upload is stored but its answer is lost: the retry must not duplicate it.
    cloud.fail_next(Failure(500, "Internal error", store_first=True))

    status_app = create_status_app(settings)
    async with LifespanManager(status_app), run_processor(settings):
        transport = httpx.ASGITransport(app=status_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://status") as http:
            await tap.bus.publish(make_request(request_id, [urls[:3], urls[3:]]))
            completed = await tap.until(request_id, RequestCompleted)
            status = await status_of(http, request_id)
    await tap.flush()

    assert completed.data.counts.model_dump() == {"total": 5, "ok": 4, "failed": 1}
    processed = {e.data.image_key: e.data for e in tap.of(request_id, ImageProcessed)}
    ok = {key: data for key, data in processed.items() if data.outcome == "ok"}
    assert set(ok) == {"0-0", "0-1", "0-2", "1-0"}

    # One asset per image, shared (named by its input and options, no request's tag);
    # the output URL of each image is its asset's secure_url.
    records = image_records(settings, request_id)
    public_ids = {key: f"imgpipe/objects/{records[key]['output_key']}" for key in ok}
    assert set(cloud.assets) == set(public_ids.values())
    assert len(cloud.uploads) == 5  # four images, one of them twice
    for key, data in ok.items():
        asset = cloud.assets[public_ids[key]]
        assert data.output_url == asset.secure_url(cloud.cloud_name)
        assert data.output_url.startswith("https://res.cloudinary.com/imgpipe-test/")
        assert asset.tags == [] and asset.asset_folder == "imgpipe/objects"
        assert data.bytes_out == len(asset.data)
        assert (data.width, data.height) == (asset.width, asset.height)
    assert cloud.assets[public_ids["0-1"]].format == "webp"  # the PNG with alpha
    assert processed["1-1"].outcome == "failed" and processed["1-1"].error.code == "http_error"
    assert not (settings.media_dir / request_id).exists()  # nothing stored locally

    # The processor's image records keep what Cloudinary said about each asset.
    for key, data in ok.items():
        asset = cloud.assets[public_ids[key]]
        assert records[key]["storage"] == {
            "backend": "cloudinary",
            "secure_url": data.output_url,
            "public_id": asset.public_id,
            "version": asset.version,
            "bytes": len(asset.data),
            "format": asset.format,
            "width": asset.width,
            "height": asset.height,
        }

    # What a user sees: the status service lists the Cloudinary URLs in input order.
    assert status["status"] == "completed"
    assert [p["output_urls"] for p in status["products"]] == [
        [ok["0-0"].output_url, ok["0-1"].output_url, ok["0-2"].output_url],
        [ok["1-0"].output_url, None],
    ]


async def test_wrong_credentials_fail_each_image_with_a_clear_reason(
    processor_settings, cloud, image_server, tap, run_processor, make_request, caplog
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-secret-Hx7pQ2"
    settings = with_cloudinary(processor_settings, cloud.cloudinary_url(api_secret=wrong))
    urls = serve(image_server, 3)
    request_id = uuid.uuid4().hex

    async with run_processor(settings):
        await tap.bus.publish(make_request(request_id, [urls]))
        completed = await tap.until(request_id, RequestCompleted)
    await tap.flush()

    assert completed.data.status == "error"
    assert completed.data.counts.model_dump() == {"total": 3, "ok": 0, "failed": 3}
    for event in tap.of(request_id, ImageProcessed):
        assert event.data.outcome == "failed" and event.data.output_url is None
        assert event.data.error.code == "storage_failed"
        assert "refused the credentials (HTTP 401)" in event.data.error.message
        assert "check the API key and secret in CLOUDINARY_URL" in event.data.error.message
        assert wrong not in event.data.error.message
    assert len(cloud.uploads) == 3 and not cloud.assets  # one attempt each: no retry helps
    assert wrong not in caplog.text
    assert wrong not in str(image_records(settings, request_id))


async def test_a_misconfigured_cloudinary_url_stops_the_processor_at_start_up(
    processor_settings, run_processor
) -> None:
    settings = with_cloudinary(processor_settings, "cloudinary://only-a-key@my-cloud")
    with pytest.raises(CloudinaryConfigError, match="CLOUDINARY_URL has no API secret"):
        async with run_processor(settings):
            pass
