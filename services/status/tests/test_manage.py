"""Managed requests in the read model: cancelled, retried (rounds), deleted.

Against the real database and broker. The read-model tests store events as the service
does (`change_for` + `StatusRepository.write`) to control the order exactly; the service
tests publish them on the broker.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from pymongo import AsyncMongoClient

from imgpipe.contracts.bus import Bus
from imgpipe.contracts.events import CloudEvent, Row
from imgpipe.contracts.settings import Settings
from imgpipe.status.adapters.repository import DELETED, StatusRepository
from imgpipe.status.app import create_app
from imgpipe.status.config import ReadCacheConfig
from imgpipe.status.handlers import change_for
from imgpipe.status.schemas import StatusResponse
from imgpipe.status.views import is_visible, render
from tests.support import events
from tests.support.apps import serving_with_bus
from tests.support.events import new_request_id

ROWS = [
    Row(serial_number="1", product_name="Shoe", input_urls=["http://in/a.jpg", "http://in/b.jpg"]),
    Row(serial_number="2", product_name="Hat", input_urls=["http://in/c.jpg"]),
]
TOTAL = 3
KEYS = [(0, 0), (0, 1), (1, 0)]
RETRIED = "0-1"  # fails in round 0, succeeds in round 1


def received(request_id: str) -> CloudEvent:
    return events.received(request_id, ROWS)


def outcome(request_id: str, row: int, position: int, round: int = 0, ok: bool = True) -> Any:
    url = ROWS[row].input_urls[position]
    return events.processed_in_round(request_id, row, position, round, input_url=url, ok=ok)


def first_run(request_id: str) -> list[CloudEvent]:
    """Round 0: 0-1 fails, the request completes with one failure."""
    return [
        received(request_id),
        outcome(request_id, 0, 0),
        outcome(request_id, 0, 1, ok=False),
        outcome(request_id, 1, 0),
        events.completed(request_id, ok=2, failed=1),
    ]


def retry_run(request_id: str) -> list[CloudEvent]:
    """Round 1: 0-1 again, ok this time."""
    return [
        events.retry_started(request_id, 1, [RETRIED]),
        outcome(request_id, 0, 1, round=1),
        events.completed_in_round(request_id, 1, ok=3),
    ]


def url(request_id: str, key: str, round: int = 0) -> str:
    return f"http://media/{request_id}/{key}{f'-r{round}' if round else ''}.jpg"


@pytest.fixture
async def fresh(
    mongo: AsyncMongoClient, settings: Settings
) -> AsyncIterator[Callable[[], StatusRepository]]:
    """Read models in databases of their own, dropped afterwards."""
    names: list[str] = []

    def make() -> StatusRepository:
        names.append(f"{settings.database_name('status')}_manage_{len(names)}")
        return StatusRepository(mongo[names[-1]])

    try:
        yield make
    finally:
        for name in names:
            await mongo.drop_database(name)


async def apply(repository: StatusRepository, stored: list[CloudEvent], batch: int = 1) -> None:
    for start in range(0, len(stored), batch):
        await repository.write([change_for(event) for event in stored[start : start + batch]])


async def answer(repository: StatusRepository, request_id: str) -> dict[str, Any]:
    doc = await repository.get(request_id)
    assert doc is not None and is_visible(doc)
    rendered = render(doc)
    body = json.loads(rendered.body)
    # The documented schema holds every answer, byte for byte.
    assert StatusResponse.model_validate_json(rendered.body).model_dump_json().encode() == (
        rendered.body
    )
    return {**body, "settled": rendered.settled, "csv": rendered.csv.decode()}


def output_cells(csv_text: str) -> list[str]:
    return [row[3] for row in list(csv.reader(io.StringIO(csv_text)))[1:]]


# Cancelled ---------------------------------------------------------------------------


async def test_a_cancelled_request_is_final_and_late_outcomes_still_show(
    fresh: Callable[[], StatusRepository],
) -> None:
    request_id = new_request_id()
    repository = fresh()
    await apply(repository, [received(request_id), outcome(request_id, 0, 0)])
    await apply(repository, [events.cancelled(request_id, TOTAL, ok=1)])
    body = await answer(repository, request_id)
    assert body["status"] == "cancelled"
    assert body["round"] == 0
    assert body["progress"] == {"total": TOTAL, "ok": 1, "failed": 0}
    assert body["error_message"] == "cancelled: 2 of 3 images not processed"
    assert not body["settled"]  # images may still be in flight
    assert output_cells(body["csv"]) == [f"{url(request_id, '0-0')},", ""]

    # Images that were in flight when it stopped finish: they show, the status stays.
    await apply(repository, [outcome(request_id, 0, 1)])
    body = await answer(repository, request_id)
    assert body["status"] == "cancelled"
    assert body["progress"] == {"total": TOTAL, "ok": 2, "failed": 0}
    assert output_cells(body["csv"]) == [f"{url(request_id, '0-0')},{url(request_id, '0-1')}", ""]
    await apply(repository, [outcome(request_id, 1, 0, ok=False)])
    body = await answer(repository, request_id)
    assert body["error_message"] == "cancelled: 1 of 3 failed"
    assert not body["settled"]  # every image known, but a failed one may be retried

    # Settled once every image is known and none failed.
    other = new_request_id()
    await apply(repository, [received(other), *(outcome(other, r, p) for r, p in KEYS)])
    await apply(repository, [events.cancelled(other, TOTAL, ok=2)])
    body = await answer(repository, other)
    assert (body["status"], body["settled"], body["error_message"]) == (
        "cancelled",
        True,
        "cancelled",
    )


# Retries -----------------------------------------------------------------------------


async def test_a_retry_reopens_the_request_and_its_outcomes_replace_the_failed_ones(
    fresh: Callable[[], StatusRepository],
) -> None:
    request_id = new_request_id()
    repository = fresh()
    start, (retry, retried, done) = first_run(request_id), retry_run(request_id)
    await apply(repository, start)
    body = await answer(repository, request_id)
    assert (body["status"], body["round"], body["error_message"]) == (
        "completed",
        0,
        "1 of 3 images failed",
    )
    assert body["products"][0]["errors"][1]["code"] == "download_failed"
    assert not body["settled"]  # a failed image: a retry may reopen it

    await apply(repository, [retry])
    body = await answer(repository, request_id)
    assert (body["status"], body["round"], body["error_message"]) == ("processing", 1, None)
    # The retried image is pending: neither the old error nor an output.
    assert body["products"][0]["output_urls"] == [url(request_id, "0-0"), None]
    assert body["products"][0]["errors"] == [None, None]
    assert body["products"][0]["attempts"][1] is None
    assert body["progress"] == {"total": TOTAL, "ok": 2, "failed": 0}

    await apply(repository, [retried])
    body = await answer(repository, request_id)
    assert body["status"] == "processing"
    assert body["products"][0]["output_urls"] == [
        url(request_id, "0-0"),
        url(request_id, RETRIED, 1),
    ]

    await apply(repository, [done])
    body = await answer(repository, request_id)
    assert (body["status"], body["round"], body["error_message"]) == ("completed", 1, None)
    assert body["progress"] == {"total": TOTAL, "ok": 3, "failed": 0}
    assert body["bytes"]["images"] == 3
    assert body["settled"]
    assert output_cells(body["csv"]) == [
        f"{url(request_id, '0-0')},{url(request_id, RETRIED, 1)}",
        url(request_id, "1-0"),
    ]


async def test_late_and_repeated_events_of_earlier_rounds_change_nothing(
    fresh: Callable[[], StatusRepository],
) -> None:
    request_id = new_request_id()
    start, (retry, retried, done) = first_run(request_id), retry_run(request_id)
    reference = fresh()
    await apply(reference, [*start, retry, retried, done])
    expected = await answer(reference, request_id)

    # RequestCompleted(0) delivered after RetryStarted(1): the request stays processing.
    repository = fresh()
    await apply(repository, [*start[:-1], retry, start[-1]])
    body = await answer(repository, request_id)
    assert (body["status"], body["round"]) == ("processing", 1)
    # RetryStarted(1) delivered after RequestCompleted(1) does not reopen it, and a
    # redelivered round-0 failure after its round-1 success does not replace it.
    await apply(repository, [retried, done, retry, start[2], start[-1]])
    assert await answer(repository, request_id) == expected

    # Round 1's events before round 0's, each twice.
    repository = fresh()
    await apply(repository, [done, retried, retry, *reversed(start), retried, *start])
    assert await answer(repository, request_id) == expected


async def test_any_order_of_both_rounds_converges(fresh: Callable[[], StatusRepository]) -> None:
    request_id = new_request_id()
    every = [*first_run(request_id), *retry_run(request_id)]
    answers = []
    for seed in range(4):
        rng = random.Random(seed)
        shuffled = [*every, *rng.sample(every, 4)]
        rng.shuffle(shuffled)
        repository = fresh()
        await apply(repository, shuffled, batch=rng.randint(1, 5))
        answers.append(await answer(repository, request_id))
    assert all(body == answers[0] for body in answers)
    assert (answers[0]["status"], answers[0]["round"]) == ("completed", 1)


# Deleted -----------------------------------------------------------------------------


async def documents_of(repository: StatusRepository, request_id: str) -> dict[str, list[Any]]:
    """Every document in the read model's database that names the request."""
    database = repository.requests.database
    found = {}
    for name in await database.list_collection_names():
        query = {
            "$or": [
                {"_id": request_id},
                {"_id": {"$regex": f"^{request_id}:"}},
                {"request_id": request_id},
            ]
        }
        found[name] = await database[name].find(query).to_list(None)
    return found


def only_the_tombstone(found: dict[str, list[Any]], request_id: str) -> bool:
    tombstones = found.pop(DELETED)
    assert [sorted(doc) for doc in tombstones] == [["_id", "deleted", "deleted_at"]]
    assert tombstones[0]["_id"] == request_id and tombstones[0]["deleted"] is True
    assert found and all(docs == [] for docs in found.values()), found
    return True


async def test_a_deleted_request_leaves_only_a_tombstone_even_after_late_events(
    fresh: Callable[[], StatusRepository],
) -> None:
    request_id = new_request_id()
    repository = fresh()
    start = first_run(request_id)
    await apply(repository, [*start, *retry_run(request_id)[:1]])
    await apply(repository, [events.deleted(request_id)])
    assert await repository.get(request_id) is None
    assert only_the_tombstone(await documents_of(repository, request_id), request_id)

    # Late events: an image still in flight, redeliveries, even the deletion again.
    late = [outcome(request_id, 0, 1, round=1), *start, events.deleted(request_id)]
    await apply(repository, late, batch=3)
    # A process that never saw the deletion (another instance, or this one restarted).
    await apply(StatusRepository(repository.requests.database), late)
    assert await repository.get(request_id) is None
    assert only_the_tombstone(await documents_of(repository, request_id), request_id)


# Through the service -----------------------------------------------------------------


class FrozenClock:
    """The cache's clock never moves: every new answer comes from a write dropping the
    cached one, never from a TTL running out."""

    def __call__(self) -> float:
        return 1000.0


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, Bus, Any]]:
    app = create_app(settings, ReadCacheConfig(ttl=600, final_ttl=600), FrozenClock())
    async with serving_with_bus(app, settings, "http://status") as (client, bus):
        yield client, bus, app


async def poll(
    client: httpx.AsyncClient, path: str, until: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    last: Any = None
    for _ in range(300):
        response = await client.get(path)
        last = response.json() if response.status_code == 200 else response.status_code
        if response.status_code == 200 and until(last):
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"condition never held; last answer: {last}")


async def drain(client: httpx.AsyncClient, bus: Bus) -> None:
    """Everything published so far is stored once a request published last shows."""
    sentinel = new_request_id()
    await bus.publish(received(sentinel))
    await poll(client, f"/status/{sentinel}", lambda b: True)


async def test_cancel_retry_and_delete_through_the_service(settings: Settings) -> None:
    cancelled_id, retried_id, deleted_id = new_request_id(), new_request_id(), new_request_id()
    async with running(settings) as (client, bus, app):
        # Cancelled: final status, in the answer and in the CSV's header.
        await bus.publish(received(cancelled_id))
        await bus.publish(outcome(cancelled_id, 0, 0))
        await bus.publish(events.cancelled(cancelled_id, TOTAL, ok=1))
        path = f"/status/{cancelled_id}"
        body = await poll(client, path, lambda b: b["status"] == "cancelled")
        assert body["progress"] == {"total": TOTAL, "ok": 1, "failed": 0}
        response = await client.get(f"{path}/output.csv")
        assert response.headers["x-imgpipe-status"] == "cancelled"
        assert output_cells(response.text) == [f"{url(cancelled_id, '0-0')},", ""]

        # Retried: the cached "completed" answer goes with the write of RetryStarted.
        path = f"/status/{retried_id}"
        start, (retry, retried, done) = first_run(retried_id), retry_run(retried_id)
        for event in start:
            await bus.publish(event)
        body = await poll(client, path, lambda b: b["status"] == "completed")
        assert body["products"][0]["output_urls"] == [url(retried_id, "0-0"), None]
        await bus.publish(retry)
        body = await poll(client, path, lambda b: b["status"] == "processing")
        assert body["round"] == 1
        assert body["products"][0]["output_urls"][1] is None
        assert body["products"][0]["errors"][1] is None
        await bus.publish(retried)
        body = await poll(client, path, lambda b: b["products"][0]["output_urls"][1] is not None)
        assert body["status"] == "processing"
        await bus.publish(done)
        body = await poll(client, path, lambda b: b["status"] == "completed")
        assert (body["round"], body["progress"]["failed"], body["error_message"]) == (1, 0, None)
        response = await client.get(f"{path}/output.csv")
        assert response.headers["x-imgpipe-status"] == "completed"
        assert output_cells(response.text) == [
            f"{url(retried_id, '0-0')},{url(retried_id, RETRIED, 1)}",
            url(retried_id, "1-0"),
        ]

        # Deleted: a settled, cached answer goes too; late events bring nothing back.
        path = f"/status/{deleted_id}"
        await bus.publish(received(deleted_id))
        for r, p in KEYS:
            await bus.publish(outcome(deleted_id, r, p))
        await bus.publish(events.completed(deleted_id, ok=3))
        await poll(client, path, lambda b: b["status"] == "completed")
        assert (await client.get(f"{path}/output.csv")).status_code == 200
        await bus.publish(events.deleted(deleted_id))
        for _ in range(300):
            if (await client.get(path)).status_code == 404:
                break
            await asyncio.sleep(0.05)
        assert (await client.get(path)).status_code == 404
        assert (await client.get(f"{path}/output.csv")).status_code == 404
        await bus.publish(outcome(deleted_id, 0, 1, round=1))
        await bus.publish(received(deleted_id))
        await drain(client, bus)
        assert (await client.get(path)).status_code == 404
        repository = app.state.runtime.repository
        assert only_the_tombstone(await documents_of(repository, deleted_id), deleted_id)
