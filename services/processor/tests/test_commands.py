"""Cancel, retry and delete, with the handlers called directly (real broker and
database), for the at-least-once corners the system tests cannot reach."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

from imgpipe.contracts.events import (
    CancelRequested,
    ImageProcessed,
    RequestCancelled,
    RequestCompleted,
    RequestDeleted,
    RetryRequested,
    RetryStarted,
)
from imgpipe.contracts.settings import Settings
from imgpipe.processor.handlers import Processor
from imgpipe.processor.jobs import Job, jobs_for
from tests.support.http_server import LoopbackServer, Response
from tests.support.images import jpeg_bytes
from tests.support.tap import EventTap, event_tap

NOW = datetime.now(UTC)


@pytest.fixture
async def tap(settings: Settings) -> AsyncIterator[EventTap]:
    """Every event, the processor's answers to commands included."""
    async with event_tap(settings) as tap:
        yield tap


def serve_images(server: LoopbackServer, count: int) -> list[str]:
    return [
        server.add(f"/{i}", Response(jpeg_bytes(64, 48, seed=i), content_type="image/jpeg"))
        for i in range(count)
    ]


async def waiting_jobs(tap: EventTap) -> list[Job]:
    """Take every job waiting on the jobs queue."""
    name = tap.bus.topology.queue_name("processor.jobs")
    jobs = []
    async with tap.bus.connection.channel() as channel:
        queue = await channel.declare_queue(name, passive=True)
        while (message := await queue.get(fail=False)) is not None:
            jobs.append(Job.model_validate_json(message.body))
            await message.ack()
    return jobs


async def test_a_cancel_stops_the_images_not_started_and_ends_the_request_once(
    tap: EventTap, processor: Processor, make_request, image_server: LoopbackServer
) -> None:
    urls = serve_images(image_server, 4)
    request_id = uuid.uuid4().hex
    received = make_request(request_id, [urls])
    await processor.request_received(received.data)
    first, *rest = jobs_for(received.data, per_job=1)
    await processor.process_job(first)

    cancel = CancelRequested(request_id=request_id, requested_at=NOW)
    await processor.commands.cancel(cancel)
    await processor.commands.cancel(cancel)  # redelivered
    for job in rest:
        await processor.process_job(job)
    await tap.flush()

    assert [len(image_server.requests_to(f"/{i}")) for i in range(4)] == [1, 0, 0, 0]
    [cancelled] = tap.of(request_id, RequestCancelled)
    assert cancelled.data.counts.model_dump() == {"total": 4, "ok": 1, "failed": 0}
    assert tap.of(request_id, RequestCompleted) == []


async def test_a_retry_runs_the_failed_images_alone_once_however_often_it_is_delivered(
    tap: EventTap, processor: Processor, make_request, image_server: LoopbackServer
) -> None:
    urls = serve_images(image_server, 2)
    missing = image_server.url("/later")  # 404 for the first run
    request_id = uuid.uuid4().hex
    received = make_request(request_id, [urls + [missing]])
    await processor.request_received(received.data)
    for job in await waiting_jobs(tap):
        await processor.process_job(job)
    await tap.flush()
    [first_end] = tap.of(request_id, RequestCompleted)
    assert first_end.data.counts.model_dump() == {"total": 3, "ok": 2, "failed": 1}

    image_server.add("/later", Response(jpeg_bytes(64, 48, seed=9), content_type="image/jpeg"))
    retry = RetryRequested(request_id=request_id, round=1, requested_at=NOW)
    await processor.commands.retry(retry)
    await processor.commands.retry(retry)  # redelivered: no second round
    jobs = await waiting_jobs(tap)
    assert [image.input_url for job in jobs for image in job.images] == [missing]
    for job in jobs:
        await processor.process_job(job)
    await tap.flush()

    [started] = tap.of(request_id, RetryStarted)
    assert (started.data.round, started.data.image_keys) == (1, ["0-2"])
    ends = tap.of(request_id, RequestCompleted)
    assert [(e.data.round, e.data.counts.model_dump()) for e in ends] == [
        (0, {"total": 3, "ok": 2, "failed": 1}),
        (1, {"total": 3, "ok": 3, "failed": 0}),
    ]
    assert ends[1].id != ends[0].id  # a new fact for consumers that dedupe on ids
    retried = [e for e in tap.of(request_id, ImageProcessed) if e.data.round == 1]
    assert [(e.data.image_key, e.data.outcome) for e in retried] == [("0-2", "ok")]
    assert retried[0].id.endswith(":r1")
    assert [len(image_server.requests_to(f"/{i}")) for i in range(2)] == [1, 1]

    stale = Job(request_id=request_id, images=jobs[0].images)  # a round-0 job, late
    await processor.process_job(stale)
    await tap.flush()
    assert len(image_server.requests_to("/later")) == 2  # the first run's, and the retry's


async def test_a_delete_removes_the_files_and_records_and_late_jobs_do_nothing(
    settings: Settings,
    tap: EventTap,
    processor: Processor,
    make_request,
    image_server: LoopbackServer,
) -> None:
    urls = serve_images(image_server, 2)
    request_id = uuid.uuid4().hex
    received = make_request(request_id, [urls])
    await processor.request_received(received.data)
    jobs = await waiting_jobs(tap)
    for job in jobs:
        await processor.process_job(job)
    media = settings.media_dir / "objects"
    assert len(list(media.iterdir())) == 2

    deleted = RequestDeleted(request_id=request_id, deleted_at=NOW)
    await processor.commands.delete(deleted)
    await processor.commands.delete(deleted)  # redelivered
    assert list(media.iterdir()) == []
    repository = processor.repository
    assert await repository.images_with_outcome(request_id, "ok") == []
    tombstone = await repository.get_request(request_id)
    assert tombstone is not None and set(tombstone) == {"_id", "deleted", "deleted_at"}

    for job in jobs:  # redelivered late
        await processor.process_job(job)
    await processor.request_received(received.data)
    assert list(media.iterdir()) == []
    assert [len(image_server.requests_to(f"/{i}")) for i in range(2)] == [1, 1]
