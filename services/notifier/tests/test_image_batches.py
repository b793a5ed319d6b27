"""ImageProcessed handling against a real database: images are inserted once, bursts share
a write, and a request whose processing webhook is planned costs no request update."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest

from imgpipe.contracts import mongo
from imgpipe.contracts.batching import Batcher
from imgpipe.contracts.events import (
    CloudEvent,
    Counts,
    ImageProcessed,
    RequestCompleted,
    RequestReceived,
    Row,
    image_key,
)
from imgpipe.contracts.settings import Settings
from imgpipe.notifier.adapters.deliveries import OLD_UNIQUE_INDEX, Deliveries
from imgpipe.notifier.adapters.repository import NotifierRepository
from imgpipe.notifier.adapters.requests import Requests
from imgpipe.notifier.config import NotifierConfig
from imgpipe.notifier.handlers import Deps, handle_event

IMAGES = 12
T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
HOOK = "http://hook.invalid/x"


class CountingRequests(Requests):
    """The real request facts, counting the calls an image batch makes."""

    calls: dict[str, int]

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    async def store_images(self, batch: list[ImageProcessed]) -> None:
        self._count("store_images")
        await super().store_images(batch)

    async def note_processing(self, request_id: str, at: datetime) -> dict[str, Any]:
        self._count("note_processing")
        return await super().note_processing(request_id, at)


class CountingRepository(NotifierRepository):
    requests: CountingRequests


@pytest.fixture
async def repo(settings: Settings) -> AsyncIterator[CountingRepository]:
    client = mongo.connect(settings)
    db = mongo.service_database(client, settings, "notifier")
    repository = CountingRepository(db)
    repository.requests = CountingRequests(db)
    repository.requests.calls = {}
    await repository.ensure_indexes()
    try:
        yield repository
    finally:
        await client.close()


def new_deps(repo: NotifierRepository, settings: Settings) -> Deps:
    return Deps(repo, settings, NotifierConfig(completion_grace=30.0))


def event(data: Any) -> CloudEvent:
    return CloudEvent.wrap(data, source="test", id=uuid.uuid4().hex)


def received(request_id: str) -> CloudEvent:
    rows = [
        Row(serial_number=str(i), product_name="p", input_urls=[f"http://in/{i}.jpg"])
        for i in range(IMAGES)
    ]
    data = RequestReceived(
        request_id=request_id, rows=rows, image_count=IMAGES, webhook_url=HOOK, received_at=T0
    )
    return event(data)


def image(request_id: str, row: int) -> ImageProcessed:
    return ImageProcessed(
        request_id=request_id,
        image_key=image_key(row, 0),
        row_index=row,
        position=0,
        input_url=f"http://in/{row}.jpg",
        outcome="ok",
        output_url=f"http://out/{row}.jpg",
        bytes_in=1000,
        bytes_out=300,
    )


def completed(request_id: str) -> CloudEvent:
    counts = Counts(total=IMAGES, ok=IMAGES, failed=0)
    data = RequestCompleted(
        request_id=request_id, status="completed", counts=counts, completed_at=T0
    )
    return event(data)


async def trickle(deps: Deps, request_id: str, rows: range) -> None:
    """Images arriving a few milliseconds apart, each handled as the bus would."""
    handlers = []
    for row in rows:
        handlers.append(asyncio.create_task(handle_event(event(image(request_id, row)), deps)))
        await asyncio.sleep(0.005)
    await asyncio.gather(*handlers)


async def webhook_types(repo: NotifierRepository, request_id: str) -> list[str]:
    docs = (
        await repo.deliveries.collection.find({"request_id": request_id}).sort("seq", 1).to_list()
    )
    return [doc["event_type"] for doc in docs]


async def test_a_duplicate_image_is_stored_once(repo: CountingRepository) -> None:
    request_id = uuid.uuid4().hex
    first, second = image(request_id, 0), image(request_id, 1)
    await repo.requests.store_images([first, first])
    await repo.requests.store_images([first, second])  # a redelivery next to a new image
    docs = await repo.requests.images.find({"request_id": request_id}).sort("_id", 1).to_list()
    assert docs[0] == {
        "_id": f"{request_id}:0-0",
        "request_id": request_id,
        "key": "0-0",
        "outcome": "ok",
        "output_url": "http://out/0.jpg",
        "error": None,
        "attempts": None,
        "round": 0,  # the first run's outcome; a retry's replaces it
        "bytes_in": 1000,  # for the final webhook's byte totals
        "bytes_out": 300,
    }
    assert [doc["key"] for doc in docs] == ["0-0", "1-0"]
    assert await repo.requests.image_counts(request_id) == (2, 0)


async def test_a_burst_of_images_is_one_write_and_one_request_update(
    repo: CountingRepository, settings: Settings
) -> None:
    deps = new_deps(repo, settings)
    request_id = uuid.uuid4().hex
    await handle_event(received(request_id), deps)
    await trickle(deps, request_id, range(0, 6))
    assert repo.requests.calls == {"store_images": 1, "note_processing": 1}
    assert await webhook_types(repo, request_id) == ["request.received", "request.processing"]

    # The processing webhook is known to be planned: later images are only stored.
    await trickle(deps, request_id, range(6, 11))
    assert repo.requests.calls == {"store_images": 2, "note_processing": 1}
    assert await repo.requests.image_total(request_id) == 11
    assert len(await webhook_types(repo, request_id)) == 2


async def test_the_last_image_releases_a_final_webhook_planned_elsewhere(
    repo: CountingRepository, settings: Settings
) -> None:
    # Two instances: this one knows the request, the other handles its RequestCompleted
    # while the last image is still on its way here, so the final webhook waits for it.
    here, elsewhere = new_deps(repo, settings), new_deps(repo, settings)
    request_id = uuid.uuid4().hex
    await handle_event(received(request_id), here)
    await trickle(here, request_id, range(0, IMAGES - 1))
    await handle_event(completed(request_id), elsewhere)
    assert "request.completed" not in await webhook_types(repo, request_id)

    await trickle(here, request_id, range(IMAGES - 1, IMAGES))
    assert await webhook_types(repo, request_id) == [
        "request.received",
        "request.processing",
        "request.completed",
    ]
    [final] = await repo.deliveries.collection.find(
        {"request_id": request_id, "event_type": "request.completed"}
    ).to_list()
    assert f"http://out/{IMAGES - 1}.jpg" in final["body"]


async def test_a_completion_ends_the_image_batch_window() -> None:
    """A final webhook waits for its request's last images to be stored: RequestCompleted
    must not leave them lingering for the rest of the batch window."""
    written: list[list[int]] = []

    async def write(batch: list[int]) -> list[None]:
        written.append(batch)
        return [None] * len(batch)

    batcher: Batcher[int, None] = Batcher(write, window=30.0)
    pending = asyncio.create_task(batcher.submit(1))
    await asyncio.sleep(0.05)
    assert written == []  # still waiting for company
    batcher.hurry()
    await asyncio.wait_for(pending, 5.0)
    assert written == [[1]]


async def test_with_a_prefetch_of_one_an_image_does_not_wait_for_company(
    repo: CountingRepository, settings: Settings
) -> None:
    """Each event holds its prefetch slot until its batch is written: with IMGPIPE_PREFETCH=1
    no other event can join, so waiting out the window would only stall the queue."""
    one_at_a_time = settings.model_copy(update={"prefetch": 1})
    deps = Deps(repo, one_at_a_time, NotifierConfig(image_batch_window=30.0))
    request_id = uuid.uuid4().hex
    await asyncio.wait_for(handle_event(event(image(request_id, 0)), deps), 5.0)
    assert await repo.requests.image_counts(request_id) == (1, 0)


def failed_image(request_id: str, row: int) -> ImageProcessed:
    return image(request_id, row).model_copy(
        update={"outcome": "failed", "output_url": None, "bytes_in": None, "bytes_out": None}
    )


async def test_a_later_rounds_outcome_replaces_an_earlier_one_never_the_reverse(
    repo: CountingRepository,
) -> None:
    request_id = uuid.uuid4().hex
    first = failed_image(request_id, 0)
    retried = image(request_id, 0).model_copy(update={"round": 1})
    again = failed_image(request_id, 0).model_copy(update={"round": 2})
    await repo.requests.store_images([first])
    await repo.requests.store_images([retried, first])  # round 1, and round 0 redelivered
    [doc] = await repo.requests.load_images(request_id)
    assert (doc["round"], doc["outcome"]) == (1, "ok")
    await repo.requests.store_images([again, retried])  # either order in one batch
    await repo.requests.store_images([retried, first])
    [doc] = await repo.requests.load_images(request_id)
    assert (doc["round"], doc["outcome"]) == (2, "failed")
    assert await repo.requests.round_image_total(request_id, 2) == 1


async def test_deliveries_made_before_rounds_become_round_0s(settings: Settings) -> None:
    """The unique index before rounds would refuse a retry's webhooks: it is replaced,
    and the deliveries already there are round 0's."""
    client = mongo.connect(settings)
    try:
        db = mongo.service_database(client, settings, "notifier-legacy")
        old = [("request_id", 1), ("endpoint", 1), ("event_type", 1)]
        await db["deliveries"].create_index(old, unique=True)
        legacy = {"_id": "dlv_old", "request_id": "r", "endpoint": "e", "event_type": "t"}
        await db["deliveries"].insert_one(legacy)
        deliveries = Deliveries(db)
        await deliveries.ensure_indexes()
        await deliveries.ensure_indexes()  # a second start finds nothing to do
        assert OLD_UNIQUE_INDEX not in await db["deliveries"].index_information()
        assert (await deliveries.get("dlv_old") or {}).get("round") == 0
        same = {**legacy, "round": 0}
        assert not await deliveries.add({**same, "_id": "dlv_again"})  # type: ignore[typeddict-item]
        assert await deliveries.add({**same, "_id": "dlv_r1", "round": 1})  # type: ignore[typeddict-item]
    finally:
        await client.drop_database(db.name)
        await client.close()
