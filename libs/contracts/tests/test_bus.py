"""The bus against the real broker: confirmed publish, consume, dead-lettering."""

from __future__ import annotations

import asyncio
import gc
from datetime import UTC, datetime

import aio_pika

from imgpipe.contracts.bus import Bus
from imgpipe.contracts.events import (
    CloudEvent,
    Counts,
    RequestCompleted,
    parse_event,
)
from imgpipe.contracts.settings import Settings
from imgpipe.contracts.topology import Topology


def completed(request_id: str) -> CloudEvent[RequestCompleted]:
    data = RequestCompleted(
        request_id=request_id,
        status="completed",
        counts=Counts(total=1, ok=1, failed=0),
        completed_at=datetime.now(UTC),
    )
    return CloudEvent.wrap(data, source="test", id=f"{request_id}:completed")


def test_envelope_round_trip() -> None:
    event = completed("r1")
    parsed = parse_event(event.to_bytes())
    assert isinstance(parsed.data, RequestCompleted)
    assert parsed.type == "io.imgpipe.request.completed.v1"
    assert parsed.subject == "r1"
    assert parsed.id == "r1:completed"


def test_parsing_after_a_garbage_collection_builds_no_model_class() -> None:
    # Building a parametrized envelope class costs ~0.5 ms; pydantic's cache holds them
    # only weakly, so one made per parse was built again after each collection.
    body = completed("r1").to_bytes()
    parse_event(body)
    gc.collect()
    classes = len(CloudEvent.__subclasses__())
    parse_event(body)
    assert len(CloudEvent.__subclasses__()) == classes


async def test_published_event_reaches_consumer(settings: Settings) -> None:
    topology = Topology(settings.namespace)
    bus = await Bus.connect(settings.amqp_url, topology)
    received: asyncio.Queue = asyncio.Queue()

    async def handler(event) -> None:
        await received.put(event)

    try:
        await bus.consume_events("status", handler)
        await bus.publish(completed("r2"))
        event = await asyncio.wait_for(received.get(), 10)
        assert event.data.request_id == "r2"
    finally:
        await bus.close()


async def test_failing_handler_dead_letters_after_limit(settings: Settings) -> None:
    topology = Topology(settings.namespace, delivery_limit=2)
    bus = await Bus.connect(settings.amqp_url, topology)
    attempts = 0

    async def always_fails(event) -> None:
        nonlocal attempts
        attempts += 1
        raise RuntimeError("poison")

    try:
        await bus.consume_events("status", always_fails)
        await bus.publish(completed("poison"))
        await bus.publish(completed("healthy"))
        dead = await _get_dead_letter(settings.amqp_url, topology.dead_letter_queue)
        assert parse_event(dead.body).data.request_id in {"poison", "healthy"}
        assert attempts >= 2
    finally:
        await bus.close()


async def _get_dead_letter(url: str, queue_name: str) -> aio_pika.abc.AbstractIncomingMessage:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(queue_name)
        for _ in range(100):
            message = await queue.get(fail=False)
            if message is not None:
                await message.ack()
                return message
            await asyncio.sleep(0.1)
    raise AssertionError("nothing reached the dead-letter queue")
