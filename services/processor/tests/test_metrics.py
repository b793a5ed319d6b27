"""The processor's /metrics after a real request: the counters moved by what happened."""

from __future__ import annotations

import uuid

import httpx

from imgpipe.contracts.events import RequestCompleted
from tests.support.http_server import Response
from tests.support.images import jpeg_bytes
from tests.support.metrics import moved, promtool_check, scrape, scrape_until, value

PROCESSED = "imgpipe_images_processed_total"
COMPLETED = "imgpipe_requests_completed_total"


async def test_images_requests_and_downloads_are_counted(
    processor_settings, image_server, tap, run_processor, make_request
) -> None:
    good = [image_server.add(f"/m/{n}", Response(jpeg_bytes(160, 120, seed=n))) for n in range(2)]
    missing = image_server.url("/m/missing")
    request_id = uuid.uuid4().hex
    async with run_processor(processor_settings) as app:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://processor") as client:
            _, before = await scrape(client)
            await tap.bus.publish(make_request(request_id, [[*good, missing]]))
            await tap.until(request_id, RequestCompleted)
            text, after = await scrape_until(
                client,
                lambda now: (
                    moved(before, now, "imgpipe_requests_completed_total", status="completed") == 1
                ),
            )

    assert moved(before, after, PROCESSED, outcome="ok", error_code="") == 2
    assert moved(before, after, PROCESSED, outcome="failed", error_code="http_error") == 1
    assert moved(before, after, COMPLETED, status="completed") == 1
    assert moved(before, after, "imgpipe_download_attempts_total", result="ok") == 2
    assert moved(before, after, "imgpipe_download_attempts_total", result="failed") == 1
    assert moved(before, after, "imgpipe_image_bytes_in_total") > 0
    assert moved(before, after, "imgpipe_compress_duration_seconds_count") == 2
    published = "imgpipe_events_published_total"
    assert moved(before, after, published, type="io.imgpipe.image.processed.v1") == 3
    assert moved(before, after, published, type="io.imgpipe.request.completed.v1") == 1
    assert value(after, "imgpipe_process_resident_memory_bytes") > 0
    assert "imgpipe_processor_jobs_queued" in text
    promtool_check(text)


async def test_metrics_can_be_turned_off(processor_settings, run_processor) -> None:
    settings = processor_settings.model_copy(update={"metrics": False})
    async with run_processor(settings) as app:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://processor") as client:
            assert (await client.get("/metrics")).status_code == 404
