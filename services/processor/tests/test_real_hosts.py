"""The processor against image hosts that behave like real ones far away: they throttle,
hiccup, reset, stall and ask for long pauses. Every image that exists ends `ok`."""

from __future__ import annotations

import uuid

from imgpipe.contracts.events import ImageProcessed, RequestCompleted
from tests.support.images import jpeg_bytes
from tests.support.remote_host import (
    Behaviour,
    Reset,
    Stall,
    Status,
    http_date_in,
    remote_host,
)

from .test_pipeline import in_rows, stored_images


async def test_every_image_that_exists_ends_ok(
    processor_settings, tap, run_processor, make_request
) -> None:
    settings = processor_settings.model_copy(
        update={"per_host_connections": 3, "download_timeout": 2.0}
    )
    behaviour = Behaviour(latency=0.04, max_connections=3, hiccup_one_in=5)
    scripts = {
        "/throttled-seconds.jpg": [Status(429, "1")],
        "/throttled-date.jpg": [Status(429, http_date_in(1))],
        "/throttled-bare.jpg": [Status(429)],
        "/hiccup.jpg": [Status(503), Status(502)],
        "/reset.jpg": [Reset(), Reset()],
        "/stall.jpg": [Stall(4)],
    }
    with remote_host(behaviour=behaviour) as host:
        urls = [host.add(f"/{n}.jpg", jpeg_bytes(160, 120, seed=n)) for n in range(24)]
        urls += [host.add(path, jpeg_bytes(160, 120), *script) for path, script in scripts.items()]
        missing = host.url("/missing.jpg")
        request_id = uuid.uuid4().hex
        async with run_processor(settings):
            await tap.bus.publish(make_request(request_id, in_rows([*urls, missing])))
            completed = await tap.until(request_id, RequestCompleted)
        await tap.flush()

    assert completed.data.status == "completed"
    assert completed.data.counts.model_dump() == {"total": 31, "ok": 30, "failed": 1}
    processed = {e.data.input_url: e.data for e in tap.of(request_id, ImageProcessed)}
    assert all(processed[url].outcome == "ok" for url in urls)
    gone = processed[missing]
    assert gone.error.code == "http_error" and gone.attempts == 1
    assert gone.error.message == f"HTTP 404 Not Found from 127.0.0.1:{host.port}"
    assert len(host.requests_for("/missing.jpg")) == 1  # no retries of a 404
    assert processed[host.url("/hiccup.jpg")].attempts == 3
    assert processed[host.url("/stall.jpg")].attempts == 2
    assert host.peak_connections <= 3  # never more than the per-host limit
    _, images = stored_images(settings, request_id)
    attempts = {image["input_url"]: image["attempts"] for image in images}
    assert attempts[host.url("/throttled-seconds.jpg")] == 2


async def test_a_host_asking_for_a_long_wait_does_not_stall_the_others(
    processor_settings, tap, run_processor, make_request
) -> None:
    # One job in hand at a time: had the waiting image held its job, no other job could
    # start until the wait was over.
    settings = processor_settings.model_copy(update={"prefetch": 1})
    with (
        remote_host() as slow,
        remote_host(behaviour=Behaviour(latency=0.02)) as fast,
    ):
        patient = slow.add("/patient.jpg", jpeg_bytes(160, 120), Status(429, "8"))
        others = [fast.add(f"/{n}.jpg", jpeg_bytes(160, 120, seed=n)) for n in range(20)]
        request_id = uuid.uuid4().hex
        async with run_processor(settings):
            await tap.bus.publish(make_request(request_id, in_rows([patient, *others])))
            completed = await tap.until(request_id, RequestCompleted)
        await tap.flush()
        first, second = slow.requests_for("/patient.jpg")

    assert completed.data.counts.model_dump() == {"total": 21, "ok": 21, "failed": 0}
    events = tap.of(request_id, ImageProcessed)
    assert events[-1].data.input_url == patient  # the others did not wait for it
    assert events[-1].data.attempts == 2
    assert second.at - first.at >= 7.9  # the pause it asked for was honoured


async def test_one_download_per_url_in_a_request(
    processor_settings, tap, run_processor, make_request
) -> None:
    with remote_host() as host:
        chart = host.add("/size-chart.jpg", jpeg_bytes(160, 120, seed=1))
        photos = [host.add(f"/{n}.jpg", jpeg_bytes(160, 120, seed=n)) for n in range(2, 6)]
        rows = [[photo, chart] for photo in photos] + [[chart]]
        request_id = uuid.uuid4().hex
        async with run_processor(processor_settings):
            await tap.bus.publish(make_request(request_id, rows))
            completed = await tap.until(request_id, RequestCompleted)
        await tap.flush()
        chart_requests = host.requests_for("/size-chart.jpg")

    assert completed.data.counts.model_dump() == {"total": 9, "ok": 9, "failed": 0}
    assert len(chart_requests) == 1
    events = [e.data for e in tap.of(request_id, ImageProcessed)]
    places = sorted((e.row_index, e.position) for e in events if e.input_url == chart)
    assert places == [(0, 1), (1, 1), (2, 1), (3, 1), (4, 0)]
    assert len({e.output_url for e in events if e.input_url == chart}) == 1
    _, images = stored_images(processor_settings, request_id)
    assert len(images) == 9 and all(image["outcome"] == "ok" for image in images)
