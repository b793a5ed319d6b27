"""The handlers called directly (real broker and database) for the at-least-once corners."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace

from imgpipe.contracts.events import ImageProcessed, Options, RequestCompleted
from imgpipe.contracts.settings import Settings
from imgpipe.processor.adapters.repository import Outcome
from imgpipe.processor.compress import Compressed, CompressError
from imgpipe.processor.handlers import MAX_ERROR_MESSAGE, Processor
from imgpipe.processor.jobs import jobs_for
from tests.support.http_server import Response
from tests.support.images import jpeg_bytes


async def jobs_waiting(tap, settings: Settings) -> int:
    name = tap.bus.topology.queue_name("processor.jobs")
    async with tap.bus.connection.channel() as channel:  # a fresh channel: no cached answer
        queue = await channel.declare_queue(name, passive=True)
        return queue.declaration_result.message_count


async def test_redelivered_request_after_fan_out_sends_no_more_jobs(
    settings, tap, processor: Processor, make_request, image_server
) -> None:
    urls = [image_server.url(f"/{i}") for i in range(5)]
    received = make_request(uuid.uuid4().hex, [urls[:2], urls[2:]])
    await processor.request_received(received.data)
    assert await jobs_waiting(tap, settings) == 1  # 5 images make one job
    await processor.request_received(received.data)
    assert await jobs_waiting(tap, settings) == 1
    request = await processor.repository.get_request(received.data.request_id)
    assert request["fanned_out"] is True and request["total"] == 5


async def test_crash_between_outcome_and_counter_is_repaired_by_the_redelivery(
    tap, processor: Processor, make_request, image_server
) -> None:
    urls = [
        image_server.add(f"/{i}", Response(jpeg_bytes(seed=i), content_type="image/jpeg"))
        for i in range(2)
    ]
    request_id = uuid.uuid4().hex
    received = make_request(request_id, [urls])
    await processor.request_received(received.data)
    first, second = jobs_for(received.data, per_job=1)
    await processor.process_job(second)
    # The first job's worker stored its outcome and died before counting it.
    [image] = first.images
    failed = {"outcome": "failed", "error": {"code": "x", "message": "y"}}
    fields = {"request_id": request_id, **image.model_dump(), **failed}
    assert await processor.repository.record_outcomes(
        [Outcome(request_id, image.image_key, fields)]
    ) == [True]
    assert (await processor.repository.get_request(request_id))["ok"] == 1

    await processor.process_job(first)  # the broker redelivers it
    await tap.flush()

    [completed] = tap.of(request_id, RequestCompleted)
    assert completed.data.counts.model_dump() == {"total": 2, "ok": 1, "failed": 1}
    replayed = [e for e in tap.of(request_id, ImageProcessed) if e.data.image_key == "0-0"]
    assert replayed[0].data.outcome == "failed" and replayed[0].data.error.code == "x"
    assert len(image_server.requests_to("/0")) == 0  # the redelivery downloaded nothing
    request = await processor.repository.get_request(request_id)
    assert (request["ok"], request["failed"], request["completed_published"]) == (1, 1, True)


async def test_counters_ahead_of_the_images_do_not_finish_a_request_early(
    tap, processor: Processor, make_request, image_server
) -> None:
    urls = [
        image_server.add(f"/{i}", Response(jpeg_bytes(seed=i), content_type="image/jpeg"))
        for i in range(3)
    ]
    request_id = uuid.uuid4().hex
    received = make_request(request_id, [urls])
    await processor.request_received(received.data)
    jobs = list(jobs_for(received.data, per_job=1))
    await processor.process_job(jobs[0])
    await processor.repository.raise_counters(request_id, 3, 0)  # a counter that ran ahead

    await processor.process_job(jobs[1])
    await processor.process_job(jobs[0])  # a duplicate checks completion again
    await tap.flush()
    assert tap.of(request_id, RequestCompleted) == []

    await processor.process_job(jobs[2])
    await tap.flush()
    [completed] = tap.of(request_id, RequestCompleted)
    assert completed.data.counts.model_dump() == {"total": 3, "ok": 3, "failed": 0}
    assert completed.data.status == "completed"


async def test_request_where_every_image_fails_ends_in_error(
    tap, processor: Processor, make_request, image_server
) -> None:
    request_id = uuid.uuid4().hex
    received = make_request(request_id, [[image_server.url("/gone")]])
    await processor.request_received(received.data)
    [job] = jobs_for(received.data)
    await processor.process_job(job)
    await tap.flush()
    [processed] = tap.of(request_id, ImageProcessed)
    assert processed.data.outcome == "failed" and processed.data.error.code == "http_error"
    [completed] = tap.of(request_id, RequestCompleted)
    assert completed.data.status == "error"
    assert completed.data.counts.model_dump() == {"total": 1, "ok": 0, "failed": 1}


async def test_a_job_and_its_duplicate_in_one_batch_count_once(
    tap, processor: Processor, make_request, image_server
) -> None:
    url = image_server.add("/0", Response(jpeg_bytes(seed=0), content_type="image/jpeg"))
    request_id = uuid.uuid4().hex
    received = make_request(request_id, [[url]])
    await processor.request_received(received.data)
    [job] = jobs_for(received.data)
    [image] = job.images
    ok = {**image.model_dump(), "outcome": "ok", "output_url": "http://x/0-0.jpg", "error": None}
    failed = {**image.model_dump(), "outcome": "failed", "error": {"code": "x", "message": "y"}}
    # The same image twice in one bulk write: exactly one write takes effect.
    stored = await processor.repository.record_outcomes(
        [Outcome(request_id, image.image_key, ok), Outcome(request_id, image.image_key, failed)]
    )
    assert stored == [True, False]
    recorded = await processor.repository.get_images(request_id, [image.image_key])
    assert recorded[image.image_key]["outcome"] == "ok"


async def test_concurrent_duplicate_jobs_publish_one_completion(
    tap, processor: Processor, make_request, image_server
) -> None:
    urls = [
        image_server.add(f"/{i}", Response(jpeg_bytes(seed=i), content_type="image/jpeg"))
        for i in range(3)
    ]
    request_id = uuid.uuid4().hex
    received = make_request(request_id, [urls])
    await processor.request_received(received.data)
    jobs = list(jobs_for(received.data))
    await asyncio.gather(*(processor.process_job(job) for job in [*jobs, *jobs]))
    await tap.flush()

    [completed] = tap.of(request_id, RequestCompleted)
    assert completed.data.counts.model_dump() == {"total": 3, "ok": 3, "failed": 0}
    request = await processor.repository.get_request(request_id)
    assert (request["ok"], request["failed"]) == (3, 0)
    assert {e.data.image_key for e in tap.of(request_id, ImageProcessed)} == {"0-0", "0-1", "0-2"}


def test_jobs_hold_a_few_images_each_in_input_order(make_request) -> None:
    urls = [[f"http://img.example/{row}/{i}" for i in range(3)] for row in range(4)]
    jobs = list(jobs_for(make_request("r", urls).data, per_job=5))
    assert [len(job.images) for job in jobs] == [5, 5, 2]
    flat = [image.input_url for job in jobs for image in job.images]
    assert flat == [url for row in urls for url in row]
    assert jobs[0].message_id == "r:0-0..1-1" and jobs[2].message_id == "r:3-1..3-2"


async def test_an_unexpected_error_fails_its_image_not_the_job_or_the_request(
    tap, processor: Processor, make_request, image_server
) -> None:
    bodies = [jpeg_bytes(seed=i) for i in range(3)]
    urls = [
        image_server.add(f"/{i}", Response(body, content_type="image/jpeg"))
        for i, body in enumerate(bodies)
    ]
    request_id = uuid.uuid4().hex
    received = make_request(request_id, [urls])
    await processor.request_received(received.data)
    working = processor.compressor

    async def buggy(data: bytes, options: Options) -> Compressed:
        if data == bodies[1]:
            raise RuntimeError("a bug")
        return await working(data, options)

    [job] = jobs_for(received.data)
    await replace(processor, compressor=buggy).process_job(job)
    await tap.flush()

    outcomes = {e.data.image_key: e.data for e in tap.of(request_id, ImageProcessed)}
    assert [outcomes[k].outcome for k in ("0-0", "0-1", "0-2")] == ["ok", "failed", "ok"]
    assert outcomes["0-1"].error.code == "internal_error"
    [completed] = tap.of(request_id, RequestCompleted)
    assert completed.data.counts.model_dump() == {"total": 3, "ok": 2, "failed": 1}


async def test_a_long_error_message_is_shortened(
    tap, processor: Processor, make_request, image_server
) -> None:
    """A decoder may quote the stranger's bytes it choked on; the outcome keeps a digest."""
    url = image_server.add("/bad.jpg", Response(jpeg_bytes(), content_type="image/jpeg"))
    request_id = uuid.uuid4().hex
    received = make_request(request_id, [[url]])
    await processor.request_received(received.data)

    async def verbose(data: bytes, options: Options) -> Compressed:
        raise CompressError("decode_error", "cannot decode image: " + "\\x00" * 100_000)

    [job] = jobs_for(received.data)
    await replace(processor, compressor=verbose).process_job(job)
    await tap.flush()

    [processed] = tap.of(request_id, ImageProcessed)
    assert processed.data.error.code == "decode_error"
    assert processed.data.error.message.startswith("cannot decode image: \\x00")
    assert len(processed.data.error.message) == MAX_ERROR_MESSAGE


async def test_each_image_processed_carries_the_requests_running_tally(
    tap, processor: Processor, make_request, image_server
) -> None:
    """The totals after each batch: places count once each, bytes once per URL (a URL in
    two cells is stored once), a failed image only as failed."""
    bodies = [jpeg_bytes(seed=i) for i in range(2)]
    urls = [
        image_server.add(f"/{i}", Response(body, content_type="image/jpeg"))
        for i, body in enumerate(bodies)
    ]
    request_id = uuid.uuid4().hex
    received = make_request(request_id, [[urls[0], urls[1]], [urls[0], image_server.url("/gone")]])
    await processor.request_received(received.data)
    for job in jobs_for(received.data, per_job=1):  # one batch each: a tally per step
        await processor.process_job(job)
    await tap.flush()
    processed = tap.of(request_id, ImageProcessed)
    tallies = sorted((e.data.tally for e in processed), key=lambda t: (t.ok + t.failed, t.ok))
    last = tallies[-1]
    stored = await processor.repository.get_images(request_id, ["0-0", "0-1"])
    bytes_out = sum(stored[key]["bytes_out"] for key in ("0-0", "0-1"))
    assert (last.ok, last.failed, last.stored) == (3, 1, 2)
    assert (last.bytes_in, last.bytes_out) == (sum(len(body) for body in bodies), bytes_out)
    assert (last.not_modified, last.same_bytes) == (0, 0)
    # The URL in two cells is one job: both its events carry the same totals.
    first, second = [e.data.tally for e in processed if e.data.input_url == urls[0]]
    assert first == second and first.ok >= 2
