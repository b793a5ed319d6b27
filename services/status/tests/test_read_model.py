"""The read model's layout: the request's own document, and its image outcomes in pages.

Against the real database. Events go through `change_for` and `StatusRepository.write`,
the path the service takes, without the broker; one test runs the whole service.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import random
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager
from datetime import datetime, timedelta
from typing import Any

import bson
import httpx
import pytest
from asgi_lifespan import LifespanManager
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from imgpipe.contracts.batching import BatchWriter
from imgpipe.contracts.bus import Bus
from imgpipe.contracts.events import CloudEvent, Row, image_key
from imgpipe.contracts.mongo import service_database
from imgpipe.contracts.recent import RecentIds
from imgpipe.contracts.settings import Settings
from imgpipe.status.adapters.repository import REQUESTS, StatusRepository, merge
from imgpipe.status.app import create_app
from imgpipe.status.handlers import ROWS_PER_PAGE, Change, change_for, handle_event
from imgpipe.status.views import is_visible, render
from tests.support import events
from tests.support.apps import serving_with_bus
from tests.support.events import new_request_id

T0 = events.T0
# Three pages, the last one partial; rows of one to three images.
ROWS = [
    Row(
        serial_number=str(n + 1),
        product_name=f"Product {n + 1}",
        input_urls=[f"http://in/{n}-{p}.jpg" for p in range(1 + n % 3)],
    )
    for n in range(2 * ROWS_PER_PAGE + 7)
]
KEYS = [(r, p) for r, row in enumerate(ROWS) for p in range(len(row.input_urls))]
FAILED = {KEYS[5], KEYS[-1]}


def received(request_id: str) -> CloudEvent:
    return events.received(request_id, ROWS)


def processed(request_id: str, row: int, position: int) -> CloudEvent:
    ok = (row, position) not in FAILED
    return events.processed(
        request_id,
        row,
        position,
        input_url=ROWS[row].input_urls[position],
        ok=ok,
        message=f"HTTP 404 {image_key(row, position)}",
        attempts=1 if ok else 4,
        at=T0 + timedelta(seconds=1 + row, milliseconds=position),
    )


def completed(request_id: str) -> CloudEvent:
    failed = len(FAILED)
    return events.completed(request_id, len(KEYS) - failed, failed, at=T0 + timedelta(hours=1))


def outcomes(request_id: str) -> list[CloudEvent]:
    return [processed(request_id, r, p) for r, p in KEYS]


def every_event(request_id: str) -> list[CloudEvent]:
    return [received(request_id), *outcomes(request_id), completed(request_id)]


async def apply(repository: StatusRepository, events: list[CloudEvent], batch: int = 40) -> None:
    """Store events as the service does: in batches, each one bulk write."""
    for start in range(0, len(events), batch):
        await repository.write([change_for(event) for event in events[start : start + batch]])


async def write_previous_layout(database: AsyncDatabase, events: list[CloudEvent]) -> None:
    """What the previous version stored: every event `$set` into the request document,
    the rows too."""
    for event in events:
        change = change_for(event)
        fields = dict(change.fields)
        if change.row_pages is not None:
            del fields["rows_in_pages"]
            fields["rows"] = [row for _, rows in sorted(change.row_pages.items()) for row in rows]
        await database[REQUESTS].update_one(
            {"_id": change.request_id},
            {"$set": fields, "$max": {"updated_at": change.at}},
            upsert=True,
        )


def expected_products(request_id: str) -> list[dict[str, Any]]:
    products = []
    for r, row in enumerate(ROWS):
        keys = [image_key(r, p) for p in range(len(row.input_urls))]
        failed = [(r, p) in FAILED for p in range(len(row.input_urls))]
        products.append(
            {
                "serial_number": row.serial_number,
                "product_name": row.product_name,
                "input_urls": row.input_urls,
                "output_urls": [
                    None if bad else f"http://media/{request_id}/{key}.jpg"
                    for key, bad in zip(keys, failed, strict=True)
                ],
                "errors": [
                    {"code": "download_failed", "message": f"HTTP 404 {key}"} if bad else None
                    for key, bad in zip(keys, failed, strict=True)
                ],
                "attempts": [4 if bad else 1 for bad in failed],
                "reused": [None for _ in failed],
            }
        )
    return products


@pytest.fixture
async def scratch(mongo: AsyncMongoClient, settings: Settings) -> AsyncIterator[Iterator[str]]:
    """Names of extra databases (each a separate read model), dropped afterwards."""
    names: list[str] = []

    def fresh() -> Iterator[str]:
        while True:
            names.append(f"{settings.database_name('status')}_{len(names)}")
            yield names[-1]

    try:
        yield fresh()
    finally:
        for name in names:
            await mongo.drop_database(name)


def repository_in(mongo: AsyncMongoClient, name: str) -> StatusRepository:
    return StatusRepository(mongo[name])


# Layout ----------------------------------------------------------------------------------


async def test_image_outcomes_leave_the_request_document_untouched(
    mongo: AsyncMongoClient, settings: Settings
) -> None:
    repository = StatusRepository(service_database(mongo, settings, "status"))
    request_id = new_request_id()
    await apply(repository, [received(request_id)])
    before = await repository.requests.find_one({"_id": request_id})

    await apply(repository, outcomes(request_id))
    after = await repository.requests.find_one({"_id": request_id})
    assert after == before
    assert len(bson.encode(after)) == len(bson.encode(before))

    pages = await repository.pages.find({"request_id": request_id}).sort("_id").to_list(None)
    assert [page["_id"] for page in pages] == [f"{request_id}:{n}" for n in range(3)]
    assert [len(page["images"]) for page in pages] == [
        sum(1 for r, _ in KEYS if r // ROWS_PER_PAGE == n) for n in range(3)
    ]
    assert pages[0]["images"]["0-0"] == {
        "outcome": "ok",
        "output_url": f"http://media/{request_id}/0-0.jpg",
        "error": None,
        "bytes_in": 1000,
        "bytes_out": 300,
        "width": 10,
        "height": 10,
        "format": "JPEG",
        "attempts": 1,
    }
    # The completion goes to the request document, and nowhere else.
    await apply(repository, [completed(request_id)])
    final = await repository.requests.find_one({"_id": request_id})
    assert "images" not in final
    assert final["final_status"] == "completed"
    assert await repository.pages.count_documents({"request_id": request_id}) == 3


async def test_pages_are_indexed_by_request_at_start_up(settings: Settings) -> None:
    app = create_app(settings)
    async with LifespanManager(app):
        pages = app.state.runtime.repository.pages
        for _ in range(100):  # created in the background, as soon as the database answers
            indexes = await pages.index_information()
            if len(indexes) > 1:
                break
            await asyncio.sleep(0.1)
    assert sorted(tuple(spec["key"]) for spec in indexes.values()) == [
        (("_id", 1),),
        (("request_id", 1),),
    ]


def test_a_batch_updates_each_page_once() -> None:
    request_id = "r"
    changes = [change_for(event) for event in every_event(request_id)]
    requests, pages = merge(changes + changes)
    assert [update._filter for update in requests] == [{"_id": "r"}]
    assert [update._filter for update in pages] == [{"_id": f"r:{n}"} for n in range(3)]
    first = pages[0]._doc
    assert first["$setOnInsert"] == {"request_id": "r"}
    assert sorted(first["$set"]) == sorted(
        ["rows", *(f"images.{image_key(r, p)}" for r, p in KEYS if r < ROWS_PER_PAGE)]
    )
    assert first["$set"]["rows"] == [row.model_dump() for row in ROWS[:ROWS_PER_PAGE]]
    latest = max(processed(request_id, r, p).time for r, p in KEYS if r < ROWS_PER_PAGE)
    assert first["$max"] == {"updated_at": latest}


# Reading ---------------------------------------------------------------------------------


async def test_images_over_several_pages_read_back_complete_and_in_order(
    mongo: AsyncMongoClient, scratch: Iterator[str]
) -> None:
    request_id = new_request_id()
    repository = repository_in(mongo, next(scratch))
    await apply(repository, every_event(request_id))
    doc = await repository.get(request_id)
    assert len(doc["images"]) == len(KEYS)
    assert doc["updated_at"] == T0 + timedelta(hours=1)

    rendered = render(doc)
    assert not rendered.settled  # two images failed: a retry may still reopen it
    body = json.loads(rendered.body)
    assert body["products"] == expected_products(request_id)
    assert body["progress"] == {"total": len(KEYS), "ok": len(KEYS) - 2, "failed": 2}
    rows = list(csv.reader(io.StringIO(rendered.csv.decode())))[1:]
    assert [row[0] for row in rows] == [row.serial_number for row in ROWS]


async def test_the_answer_is_byte_for_byte_the_previous_layouts(
    mongo: AsyncMongoClient, scratch: Iterator[str]
) -> None:
    """The same events give the same JSON and CSV bytes in either layout."""
    request_id = new_request_id()
    images = outcomes(request_id)
    stages = [
        [received(request_id)],
        images[: len(images) // 2],
        images[len(images) // 2 :],
        [completed(request_id)],
    ]
    pages, previous = repository_in(mongo, next(scratch)), repository_in(mongo, next(scratch))
    for stage in stages:
        await apply(pages, stage)
        await write_previous_layout(previous.requests.database, stage)
        now, then = render(await pages.get(request_id)), render(await previous.get(request_id))
        assert now.body == then.body
        assert now.gzipped == then.gzipped
        assert now.csv == then.csv
        assert (now.etag, now.settled) == (then.etag, then.settled)


async def test_a_document_of_the_previous_layout_still_reads(
    mongo: AsyncMongoClient, scratch: Iterator[str]
) -> None:
    """Outcomes stored in the request document before an upgrade, the rest in pages."""
    request_id = new_request_id()
    images = outcomes(request_id)
    early, late = images[: len(images) // 3], images[len(images) // 3 :]
    mixed, reference = repository_in(mongo, next(scratch)), repository_in(mongo, next(scratch))
    await write_previous_layout(mixed.requests.database, [received(request_id), *early])
    await apply(mixed, [*late, completed(request_id)])
    await apply(reference, every_event(request_id))

    doc = await mixed.get(request_id)
    assert len(doc["images"]) == len(KEYS)
    assert render(doc).body == render(await reference.get(request_id)).body
    # A page may repeat an outcome the request document holds (a redelivery): counted once.
    await apply(mixed, early)
    again = render(await mixed.get(request_id))
    assert again.body == render(await reference.get(request_id)).body


async def test_a_page_of_rows_reads_the_same_in_either_layout(
    mongo: AsyncMongoClient, scratch: Iterator[str]
) -> None:
    """Rows in the image pages (now) or in the request document (before): any slice of
    them, across page boundaries, with the same outcomes; and the same whole document."""
    request_id = new_request_id()
    pages, previous = repository_in(mongo, next(scratch)), repository_in(mongo, next(scratch))
    await apply(pages, every_event(request_id))
    await write_previous_layout(previous.requests.database, every_event(request_id))
    assert "rows" not in (await pages.requests.find_one({"_id": request_id}) or {})
    assert (await pages.get(request_id) or {})["rows"] == [row.model_dump() for row in ROWS]
    for start, count in [(0, 1), (15, 10), (ROWS_PER_PAGE, ROWS_PER_PAGE), (40, 100), (47, 5)]:
        now, then = (
            await pages.rows_page(request_id, start, count),
            await previous.rows_page(request_id, start, count),
        )
        assert now is not None and then is not None
        assert now[0] == then[0] == [row.model_dump() for row in ROWS[start : start + count]]
        keys = {
            image_key(start + n, p)
            for n, row in enumerate(now[0])
            for p in range(len(row["input_urls"]))
        }
        assert keys <= set(now[1]["images"]) and keys <= set(then[1]["images"])
        assert {key: now[1]["images"][key] for key in keys} == {
            key: then[1]["images"][key] for key in keys
        }
    assert await pages.rows_page("req-never", 0, 10) is None


# Order and duplicates --------------------------------------------------------------------


async def test_outcomes_before_received_stay_hidden_then_converge(
    mongo: AsyncMongoClient, scratch: Iterator[str]
) -> None:
    request_id = new_request_id()
    early = repository_in(mongo, next(scratch))
    await apply(early, [*reversed(outcomes(request_id)), completed(request_id)])
    doc = await early.get(request_id)
    assert doc is not None and not is_visible(doc)  # known, but no rows yet: 404
    assert await early.get("req-never") is None
    assert await early.requests.find_one({"_id": request_id}, {"images": 1}) == {"_id": request_id}

    await apply(early, [received(request_id)])
    reference = repository_in(mongo, next(scratch))
    await apply(reference, every_event(request_id))
    assert render(await early.get(request_id)).body == render(await reference.get(request_id)).body


async def test_any_order_and_duplicates_converge(
    mongo: AsyncMongoClient, scratch: Iterator[str]
) -> None:
    request_id = new_request_id()
    events = every_event(request_id)
    answers = set()
    for seed in range(3):
        shuffled = [*events, *random.Random(seed).sample(events, 40)]
        random.Random(seed).shuffle(shuffled)
        repository = repository_in(mongo, next(scratch))
        await apply(repository, shuffled, batch=random.Random(seed).randint(1, 60))
        answers.add(render(await repository.get(request_id)).body)
    assert len(answers) == 1


# The service as a whole ------------------------------------------------------------------


def running(settings: Settings) -> AbstractAsyncContextManager[tuple[httpx.AsyncClient, Bus]]:
    return serving_with_bus(create_app(settings), settings, "http://status")


async def test_a_request_over_several_pages_through_the_service(settings: Settings) -> None:
    request_id = new_request_id()
    path = f"/status/{request_id}"
    async with running(settings) as (client, bus):
        await bus.publish_many([*reversed(outcomes(request_id)), completed(request_id)])
        await bus.publish(received(request_id))
        for _ in range(300):
            response = await client.get(path)
            if response.status_code == 200 and response.json()["products"] == (
                expected_products(request_id)
            ):
                break
            await asyncio.sleep(0.05)
        body = response.json()
        assert body["products"] == expected_products(request_id)
        assert body["status"] == "completed"
        assert datetime.fromisoformat(body["updated_at"]) == T0 + timedelta(hours=1)


# The batch writer ------------------------------------------------------------------------


async def test_updates_arriving_during_a_rest_share_one_write() -> None:
    """After a write the writer rests `min_rest`, however quick the write: a lone update
    is written at once, the next ones wait and go together. An urgent one cuts the rest."""
    writes: list[list[int]] = []

    async def write(items: list[Change]) -> None:
        writes.append([item.fields["n"] for item in items])

    writer: BatchWriter[Change] = BatchWriter(write, min_rest=60.0)
    writer.start()
    try:
        await asyncio.wait_for(writer.submit(Change("r", {"n": 0}, T0)), 5)
        later = [asyncio.create_task(writer.submit(Change("r", {"n": n}, T0))) for n in (1, 2)]
        await asyncio.sleep(0.2)
        assert writes == [[0]]  # resting: the two wait
        started = time.monotonic()
        await asyncio.wait_for(writer.submit(Change("r", {"n": 3}, T0, urgent=True)), 5)
        await asyncio.gather(*later)
        assert writes == [[0], [1, 2, 3]]
        assert time.monotonic() - started < 5
    finally:
        await writer.close()


async def test_a_rest_ends_once_flush_at_updates_wait() -> None:
    """Each event holds its prefetch slot until written, so the app sets `flush_at` to at
    most the prefetch: with IMGPIPE_PREFETCH=1 no second update could ever join a rest."""
    writes: list[list[int]] = []

    async def write(items: list[Change]) -> None:
        writes.append([item.fields["n"] for item in items])

    writer: BatchWriter[Change] = BatchWriter(write, min_rest=60.0, flush_at=1)
    writer.start()
    try:
        for n in range(3):
            await asyncio.wait_for(writer.submit(Change("r", {"n": n}, T0)), 5)
        assert writes == [[0], [1], [2]]
    finally:
        await writer.close()


async def test_the_first_outcome_of_a_request_is_urgent_the_rest_are_not() -> None:
    """The first outcome moves a request to `processing`, a change a reader (or the
    end-to-end test's poller) waits for: it must not sit out a write rest."""
    submitted: list[Change] = []

    async def submit(change: Change) -> None:
        submitted.append(change)

    started = RecentIds(10)
    first, second = new_request_id(), new_request_id()
    for event in [
        processed(first, *KEYS[0]),
        processed(first, *KEYS[1]),
        processed(second, *KEYS[0]),
    ]:
        await handle_event(event, submit, started)
    await handle_event(completed(first), submit, started)
    assert [(c.request_id, c.urgent) for c in submitted] == [
        (first, True),
        (first, False),
        (second, True),
        (first, True),  # completion is always urgent
    ]
