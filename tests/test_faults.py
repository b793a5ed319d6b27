"""Nothing lost: faults injected into the real system, checked as a user would.

Every service runs as its own process against the real broker and database. Each test
breaks one thing in the middle of a request - a processor killed or stopped, the broker
connections dropped, the database stopped, a poison message - and then checks what a
user sees: the request completes, every image appears once in the output CSV, one file
per image on disk, and RequestCompleted heard once.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import httpx
import pytest
from pymongo import MongoClient

from imgpipe.contracts.events import Options, RequestCompleted, RequestReceived, parse_event
from imgpipe.contracts.settings import Settings
from imgpipe.contracts.topology import Topology
from imgpipe.processor.jobs import Job, JobImage
from tests.support.faults import (
    DurableTap,
    RestartableMongo,
    broker_connections,
    close_broker_connections,
    csv_upload,
    dead_letters,
    get_json,
    is_ready,
    limit_connections,
    media_files,
    output_urls,
    own_vhost,
    queue_consumers,
    require_rabbitmqctl,
    wait_finished,
    wait_until,
)
from tests.support.http_server import LoopbackServer, Response, loopback_server
from tests.support.images import jpeg_bytes
from tests.support.system import System, running_system

COMPLETED = RequestCompleted.routing_key
RECEIVED = RequestReceived.routing_key
# One image worker: the machine is small and shared; faults matter, not throughput.
ENV = {"IMGPIPE_WORKERS": "1"}
# One message in hand per service: a job holds 8 images, so with a deeper prefetch a small
# request is all in flight at once and there is no "mid-request" to interrupt.
ONE_AT_A_TIME = {**ENV, "IMGPIPE_PREFETCH": "1"}
# Long enough that, were each failed attempt requeued, the work would be dead-lettered.
OUTAGE_SECONDS = 20.0

pytestmark = pytest.mark.timeout(240)


@dataclass
class Submitted:
    request_id: str
    status_url: str
    inputs: list[str]


def serve_images(
    server: LoopbackServer, count: int, delay: float, prefix: str = "img"
) -> list[str]:
    """`count` distinct JPEGs, each answered after `delay` seconds (keeps work in flight)."""
    return [
        server.add(
            f"/{prefix}/{i}.jpg",
            Response(jpeg_bytes(320, 240, seed=i), content_type="image/jpeg", delay=delay),
        )
        for i in range(count)
    ]


def submit(client: httpx.Client, system: System, urls: list[str]) -> Submitted:
    upload = client.post(
        f"{system.ingest_url}/upload",
        files={"file": ("products.csv", csv_upload(urls), "text/csv")},
    )
    assert upload.status_code == 202, upload.text
    request_id = upload.json()["request_id"]
    return Submitted(request_id, f"{system.status_url}/status/{request_id}", urls)


def progress(client: httpx.Client, submitted: Submitted) -> int:
    body = get_json(client, submitted.status_url)
    return body["progress"]["ok"] + body["progress"]["failed"] if body else 0


def wait_for_progress(client: httpx.Client, submitted: Submitted, at_least: int) -> int:
    return wait_until(
        lambda: (done := progress(client, submitted)) >= at_least and done,
        120,
        f"{at_least} images of {submitted.request_id} to be processed",
    )


def downloads_started(server: LoopbackServer, prefix: str = "/img/") -> set[str]:
    return {r.path for r in list(server.requests) if r.path.startswith(prefix)}


def wait_mid_request(
    client: httpx.Client, server: LoopbackServer, submitted: Submitted, at_least: int
) -> None:
    """Until some images are done and others are being downloaded right now."""
    wait_until(
        lambda: (
            (done := progress(client, submitted)) >= at_least
            and len(downloads_started(server)) > done
        ),
        120,
        f"{submitted.request_id} to be mid-way with downloads in flight",
        interval=0.05,
    )


def assert_nothing_lost(
    client: httpx.Client, system: System, submitted: Submitted, tap: DurableTap
) -> None:
    """The request completed with every image exactly once, in the CSV and on disk."""
    final = wait_finished(client, submitted.status_url)
    total = len(submitted.inputs)
    assert final["status"] == "completed", final
    assert final["progress"] == {"total": total, "ok": total, "failed": 0}

    outputs = output_urls(client, submitted.status_url)
    assert len(outputs) == total and all(outputs), outputs
    assert len(set(outputs)) == total, "an image appears twice in the output CSV"

    # The file each output URL names, and no other of this request's: no duplicate, no
    # orphan, no temp file left behind by a write that was cut short. Shared outputs
    # (`objects/`) may hold an earlier request's files of the same test too.
    named = {url.rsplit("/", 1)[1] for url in outputs}
    files = media_files(system.settings.media_dir, submitted.request_id)
    assert named <= set(files), sorted(named - set(files))
    assert not [name for name in files if name.startswith(".")], files
    own = system.settings.media_dir / submitted.request_id
    assert {path.name for path in own.iterdir()} <= named if own.exists() else True
    for url in outputs[:3]:
        assert client.get(url).status_code == 200

    # RequestCompleted once: redelivery may repeat a publish, but never as a new fact.
    completed = wait_until(
        lambda: [i for i in tap.ids(COMPLETED) if i.startswith(submitted.request_id)],
        30,
        "RequestCompleted on the events exchange",
    )
    assert len(set(completed)) == 1, completed


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=60) as client:
        yield client


def tap_for(settings: Settings, *keys: str) -> DurableTap:
    topology = Topology(settings.namespace, settings.delivery_limit)
    return DurableTap(settings.amqp_url, topology, keys or (COMPLETED,))


# A processor killed mid-request ------------------------------------------------------------


def test_processor_killed_mid_request_loses_and_duplicates_nothing(
    settings: Settings, client: httpx.Client
) -> None:
    with (
        loopback_server() as server,
        tap_for(settings) as tap,
        # The kill lands while the second job is in flight; the third is still queued.
        running_system(settings, **ONE_AT_A_TIME) as system,
    ):
        submitted = submit(client, system, serve_images(server, 24, delay=0.5))
        processor = system.services["processor"]
        wait_mid_request(client, server, submitted, 4)

        processor.kill()  # SIGKILL: no shutdown code runs; its unacked jobs go back
        assert progress(client, submitted) < len(submitted.inputs), "killed too late"
        processor.start()
        processor.wait_ready()

        assert_nothing_lost(client, system, submitted, tap)


# A processor stopped gracefully mid-request --------------------------------------------------


def test_processor_sigterm_mid_request_finishes_in_flight_images(
    settings: Settings, client: httpx.Client
) -> None:
    with (
        loopback_server() as server,
        tap_for(settings) as tap,
        # SIGTERM lands while the second job is in flight; the third is still queued.
        running_system(settings, **ONE_AT_A_TIME) as system,
    ):
        submitted = submit(client, system, serve_images(server, 24, delay=1.0))
        wait_mid_request(client, server, submitted, 2)

        processor = system.services["processor"]
        # It exits by itself (uvicorn re-raises the SIGTERM it handled); -9 would mean
        # it had to be killed.
        code = processor.stop(signal.SIGTERM, timeout=90)
        assert code in (0, -signal.SIGTERM), processor.log_tail()
        assert "Application shutdown complete" in processor.log_tail(200)
        begun = downloads_started(server)
        assert len(begun) < len(submitted.inputs), "stopped too late"
        # Every image the processor had begun was finished and reported before it exited;
        # the jobs it had not begun went back to the queue.
        wait_until(
            lambda: progress(client, submitted) == len(begun),
            30,
            f"the {len(begun)} images begun before SIGTERM to be reported",
        )

        processor.start()  # another processor picks up the rest
        processor.wait_ready()
        assert_nothing_lost(client, system, submitted, tap)


# The broker connections dropped under load ---------------------------------------------------


def test_broker_connections_dropped_under_load_every_service_reconnects(
    settings: Settings, client: httpx.Client
) -> None:
    require_rabbitmqctl(settings.amqp_url)
    # A vhost of the test's own: its connections can be refused for a while (so the outage
    # is seen) without touching the other tests sharing this broker.
    vhost = f"imgpipe-{settings.namespace}"
    with own_vhost(settings.amqp_url, vhost) as amqp_url:
        settings = settings.model_copy(update={"amqp_url": amqp_url})
        with (
            loopback_server() as server,
            tap_for(settings) as tap,
            running_system(settings, **ONE_AT_A_TIME) as system,
        ):
            prefix = f"imgpipe/{settings.namespace}/"
            services = set(system.services)
            named = wait_until(
                lambda: (
                    (found := broker_connections(prefix, vhost))
                    and {name.split("/")[2] for name in found.values()} >= services
                    and found
                ),
                60,
                "a named broker connection for every service",
            )
            submitted = submit(client, system, serve_images(server, 30, delay=0.3))
            wait_mid_request(client, server, submitted, 3)

            limit_connections(vhost, 0)  # hold reconnects off until /readyz is seen false
            try:
                closed = close_broker_connections(prefix, vhost)
                assert set(closed) >= set(named)
                for name, service in system.services.items():
                    wait_until(
                        lambda service=service: is_ready(client, service.url) is False,
                        60,
                        f"{name} /readyz to report the broker gone",
                    )
            finally:
                limit_connections(vhost, -1)

            for name, service in system.services.items():
                wait_until(
                    lambda service=service: is_ready(client, service.url),
                    90,
                    f"{name} to reconnect by itself",
                )
            # The robust connections re-declared their consumers on every queue.
            topology = Topology(settings.namespace, settings.delivery_limit)
            wait_until(
                lambda: all(
                    queue_consumers(vhost).get(topology.queue_name(key), 0) >= 1
                    for key, spec in topology.queues.items()
                    if spec.consumed  # delay queues have no consumer
                ),
                60,
                "a consumer on every service queue again",
            )
            assert_nothing_lost(client, system, submitted, tap)

            # The restored publisher-confirm channels carry a new request end to end too.
            again = submit(client, system, serve_images(server, 4, delay=0, prefix="again"))
            assert_nothing_lost(client, system, again, tap)


# The database stopped and started again ---------------------------------------------------


def test_database_outage_refuses_uploads_and_resumes_work_in_flight(
    settings: Settings, client: httpx.Client, tmp_path: Path
) -> None:
    with RestartableMongo(tmp_path / "secantus", tmp_path / "secantus.log") as mongo:
        # A low delivery limit: were each failed attempt requeued, a short outage would
        # dead-letter the work in flight. It must wait for the database instead.
        settings = settings.model_copy(update={"mongodb_url": mongo.url, "delivery_limit": 2})
        with (
            loopback_server() as server,
            tap_for(settings, RECEIVED, COMPLETED) as tap,
            running_system(settings, **ONE_AT_A_TIME) as system,
        ):
            submitted = submit(client, system, serve_images(server, 16, delay=0.5))
            wait_mid_request(client, server, submitted, 3)

            mongo.stop()
            outage_ends = time.monotonic() + OUTAGE_SECONDS
            try:
                refused = client.post(
                    f"{system.ingest_url}/upload",
                    files={"file": ("late.csv", csv_upload(submitted.inputs[:2]), "text/csv")},
                )
                assert refused.status_code == 503, refused.text
                processor = system.services["processor"]
                wait_until(
                    lambda: is_ready(client, processor.url) is False,
                    60,
                    "the processor's /readyz to report the database gone",
                )
                time.sleep(max(0.0, outage_ends - time.monotonic()))  # the outage lasts
            finally:
                mongo.start()

            assert_nothing_lost(client, system, submitted, tap)
            # The refused upload stored nothing and published nothing.
            with MongoClient(mongo.url) as db:
                stored = db[settings.database_name("ingest")]["requests"].distinct("_id")
            assert stored == [submitted.request_id]
            heard = tap.drain()
            received = {parse_event(h.body).subject for h in heard if h.routing_key == RECEIVED}
            assert received == {submitted.request_id}
            assert dead_letters(settings.amqp_url, tap.topology) == []


# A poison message -------------------------------------------------------------------------


def test_poison_messages_are_dead_lettered_and_do_not_block_the_queue(
    settings: Settings, client: httpx.Client
) -> None:
    topology = Topology(settings.namespace, settings.delivery_limit)
    with (
        loopback_server() as server,
        tap_for(settings) as tap,
        running_system(settings, **ENV) as system,
    ):
        # A job for an image the processor never stored fails every time it is tried;
        # an event that is not even JSON cannot be handled at all.
        poison_job = Job(
            request_id="poison" + uuid.uuid4().hex[:8],
            options=Options(),
            images=(
                JobImage(
                    image_key="0-0",
                    row_index=0,
                    position=0,
                    input_url=server.url("/img/none.jpg"),
                ),
            ),
        )
        asyncio.run(publish_poison(settings.amqp_url, topology, poison_job))
        submitted = submit(client, system, serve_images(server, 6, delay=0.1))
        assert_nothing_lost(client, system, submitted, tap)

        dead: list = []

        def both_dead_lettered() -> bool:
            dead.extend(dead_letters(settings.amqp_url, topology))
            ids = [message.message_id for message in dead]
            # The unparseable event was bound to three service queues: each refused it.
            return ids.count(UNPARSEABLE_ID) == 3 and poison_job.message_id in ids

        wait_until(both_dead_lettered, 60, "both poison messages in the dead-letter queue")
        job = next(m for m in dead if m.message_id == poison_job.message_id)
        death = job.headers["x-death"][0]
        assert death["queue"] == topology.queue_name("processor.jobs")
        assert death["reason"] == "delivery_limit"


UNPARSEABLE_ID = "poison-not-an-event"


async def publish_poison(amqp_url: str, topology: Topology, job: Job) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        events = await topology.declare(channel)
        await events.publish(
            aio_pika.Message(b"{not json", message_id=UNPARSEABLE_ID, delivery_mode=2),
            routing_key=RECEIVED,
        )
        await channel.default_exchange.publish(
            aio_pika.Message(job.to_bytes(), message_id=job.message_id, delivery_mode=2),
            routing_key=topology.queue_name("processor.jobs"),
        )
