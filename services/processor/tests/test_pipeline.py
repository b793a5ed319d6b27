"""The processor end to end: real broker, real database, images from a loopback server."""

from __future__ import annotations

import io
import uuid
from pathlib import Path

import httpx
from PIL import Image
from pymongo import MongoClient

from imgpipe.contracts.events import ImageProcessed, Options, RequestCompleted, processed_event_id
from imgpipe.contracts.settings import Settings
from imgpipe.processor.jobs import Job, JobImage
from tests.support.http_server import LoopbackServer, Response
from tests.support.images import exif_rotated_jpeg_bytes, jpeg_bytes, png_with_alpha_bytes


def serve_images(server: LoopbackServer, count: int, delay: float = 0.0) -> dict[str, bytes]:
    """`count` good images (mostly photos, one PNG with alpha, one EXIF-rotated): url -> bytes."""
    served = {}
    for i in range(count):
        if i == 1:
            body, kind = png_with_alpha_bytes(seed=i), "image/png"
        elif i == 2:
            body, kind = exif_rotated_jpeg_bytes(seed=i), "image/jpeg"
        else:
            body, kind = jpeg_bytes(480, 360, seed=i), "image/jpeg"
        url = server.add(f"/img/{i}", Response(body, content_type=kind, delay=delay))
        served[url] = body
    return served


def in_rows(urls: list[str], per_row: int = 3) -> list[list[str]]:
    return [urls[i : i + per_row] for i in range(0, len(urls), per_row)]


def media_files(settings: Settings, request_id: str) -> list[Path]:
    """Every file under the media folder (each test has its own): the request's outputs,
    shared (`objects/`) or of the request alone (`<request_id>/`), and any left-over."""
    folders = (settings.media_dir / "objects", settings.media_dir / request_id)
    return sorted(path for folder in folders if folder.exists() for path in folder.iterdir())


def file_for(settings: Settings, url: str) -> Path:
    assert url.startswith(settings.media_base_url + "/")
    return settings.media_dir / url.removeprefix(settings.media_base_url + "/")


def stored_images(settings: Settings, request_id: str) -> tuple[dict, list[dict]]:
    with MongoClient(settings.mongodb_url) as client:
        db = client[settings.database_name("processor")]
        request = db.requests.find_one({"_id": request_id})
        images = list(db.images.find({"request_id": request_id}))
    return request, images


async def test_request_is_processed_end_to_end(
    processor_settings, image_server, tap, run_processor, make_request
) -> None:
    settings = processor_settings
    served = serve_images(image_server, 8)
    missing = image_server.url("/img/missing")
    not_image = image_server.add(
        "/img/page", Response(b"<html>oops</html>", content_type="image/jpeg")
    )
    urls = [*served, missing, not_image]
    request_id = uuid.uuid4().hex

    async with run_processor(settings) as app:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://processor") as http:
            assert (await http.get("/healthz")).status_code == 200
            ready = await http.get("/readyz")
            assert ready.status_code == 200, ready.text
        await tap.bus.publish(make_request(request_id, in_rows(urls)))
        completed = await tap.until(request_id, RequestCompleted)
    await tap.flush()

    assert completed.data.status == "completed"
    assert completed.data.counts.model_dump() == {"total": 10, "ok": 8, "failed": 2}
    assert completed.source == "imgpipe.processor" and completed.subject == request_id
    assert len(tap.of(request_id, RequestCompleted)) == 1

    processed = {e.data.input_url: e for e in tap.of(request_id, ImageProcessed)}
    assert set(processed) == set(urls)
    for url, event in processed.items():
        assert event.id == processed_event_id(request_id, event.data.image_key)
    assert processed[missing].data.outcome == "failed"
    assert processed[missing].data.error.code == "http_error"
    assert "404" in processed[missing].data.error.message
    assert processed[not_image].data.error.code == "not_an_image"

    for url, original in served.items():
        data = processed[url].data
        assert data.outcome == "ok" and data.error is None
        path = file_for(settings, data.output_url)
        output = Image.open(io.BytesIO(path.read_bytes()))
        output.load()
        assert output.size == (data.width, data.height)
        assert data.bytes_in == len(original)
        assert data.bytes_out == path.stat().st_size < len(original)
    assert processed[urls[1]].data.format == "webp"  # the PNG with alpha
    assert processed[urls[2]].data.format == "jpeg"
    assert (processed[urls[2]].data.width, processed[urls[2]].data.height) == (200, 400)
    row, position = processed[urls[4]].data.row_index, processed[urls[4]].data.position
    assert (row, position) == (1, 1)

    assert len(media_files(settings, request_id)) == 8  # no temporary files left behind
    request, images = stored_images(settings, request_id)
    assert (request["ok"], request["failed"], request["total"]) == (8, 2, 10)
    assert request["completed_published"] is True


async def test_redelivered_request_and_duplicate_jobs_change_nothing(
    processor_settings, image_server, tap, run_processor, make_request
) -> None:
    settings = processor_settings
    served = serve_images(image_server, 9)
    urls = [*served, image_server.url("/img/missing")]
    request_id = uuid.uuid4().hex
    received = make_request(request_id, in_rows(urls))
    # Both deliveries wait in the queue and reach the processor together.
    await tap.bus.publish(received)
    await tap.bus.publish(received)
    first_job = Job(
        request_id=request_id,
        options=Options(),
        images=(JobImage(image_key="0-0", row_index=0, position=0, input_url=urls[0]),),
    )

    async with run_processor(settings):
        await tap.until(request_id, ImageProcessed)  # the images are stored by now
        await tap.bus.send("processor.jobs", first_job.to_bytes(), first_job.message_id)
        completed = await tap.until(request_id, RequestCompleted)
        # After completion a duplicate job only repeats what is known.
        before = len(tap.of(request_id, ImageProcessed))
        await tap.bus.send("processor.jobs", first_job.to_bytes(), first_job.message_id)
        await tap.until(request_id, ImageProcessed, count=before + 1)
    await tap.flush()

    assert completed.data.counts.model_dump() == {"total": 10, "ok": 9, "failed": 1}
    assert len(tap.of(request_id, RequestCompleted)) == 1
    processed = tap.of(request_id, ImageProcessed)
    assert {e.data.image_key for e in processed} == {
        f"{row}-{pos}" for row in range(4) for pos in range(3) if row * 3 + pos < 10
    }
    copies = [e for e in processed if e.data.image_key == "0-0"]
    assert len(copies) >= 2
    # The same fact each time; only the running tally (a snapshot of the request's
    # totals, not sent again with a replayed outcome) may differ.
    facts = {c.data.model_copy(update={"tally": None}).model_dump_json() for c in copies}
    assert {c.id for c in copies} == {copies[0].id} and len(facts) == 1

    assert len(media_files(settings, request_id)) == 9
    request, images = stored_images(settings, request_id)
    assert len(images) == 10
    assert (request["ok"], request["failed"]) == (9, 1)
    assert sorted(i["outcome"] for i in images) == ["failed"] + ["ok"] * 9


async def test_two_processors_share_one_request(
    processor_settings, image_server, tap, run_processor, make_request
) -> None:
    # One job (up to 8 images) in hand at a time, and a little latency per image, keep
    # either instance from draining the queue alone.
    settings = processor_settings.model_copy(update={"prefetch": 1})
    served = serve_images(image_server, 20, delay=0.05)
    request_id = uuid.uuid4().hex

    async with run_processor(settings), run_processor(settings):
        await tap.bus.publish(make_request(request_id, in_rows(list(served), per_row=4)))
        completed = await tap.until(request_id, RequestCompleted)
    await tap.flush()

    assert completed.data.counts.model_dump() == {"total": 20, "ok": 20, "failed": 0}
    assert len(tap.of(request_id, RequestCompleted)) == 1
    assert len({e.data.image_key for e in tap.of(request_id, ImageProcessed)}) == 20
    assert len(media_files(settings, request_id)) == 20
    request, images = stored_images(settings, request_id)
    assert len(images) == 20 and all(i["outcome"] == "ok" for i in images)
    assert (request["ok"], request["failed"]) == (20, 0)
    assert len({i["processed_by"] for i in images}) == 2  # both instances did work


async def test_a_processor_stopped_mid_request_leaves_the_rest_to_the_next_one(
    processor_settings, image_server, tap, run_processor, make_request
) -> None:
    # One job (up to 8 images) in hand at a time: the second job is left in the queue.
    settings = processor_settings.model_copy(update={"prefetch": 1})
    served = serve_images(image_server, 12, delay=0.1)
    request_id = uuid.uuid4().hex

    async with run_processor(settings):
        await tap.bus.publish(make_request(request_id, in_rows(list(served))))
        await tap.until(request_id, ImageProcessed)
    # Shut down with work in hand: jobs in progress finish, the rest go back to the queue.
    async with run_processor(settings):
        completed = await tap.until(request_id, RequestCompleted)
    await tap.flush()

    assert completed.data.counts.model_dump() == {"total": 12, "ok": 12, "failed": 0}
    assert len(tap.of(request_id, RequestCompleted)) == 1
    assert len(media_files(settings, request_id)) == 12
    request, images = stored_images(settings, request_id)
    assert all(i["outcome"] == "ok" for i in images) and len(images) == 12
    assert len({i["processed_by"] for i in images}) == 2  # each instance did part of it
