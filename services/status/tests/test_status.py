"""The status service against the real broker and database: events in, HTTP out."""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from datetime import datetime, timedelta
from typing import Any

import httpx

from imgpipe.contracts.batching import BatchWriter
from imgpipe.contracts.bus import Bus
from imgpipe.contracts.events import (
    CloudEvent,
    Options,
    Row,
)
from imgpipe.contracts.mongo import connect, service_database
from imgpipe.contracts.settings import Settings
from imgpipe.status.adapters.repository import StatusRepository
from imgpipe.status.app import create_app
from imgpipe.status.handlers import Change
from tests.support import events
from tests.support.apps import serving_with_bus
from tests.support.events import new_request_id

T0 = events.T0

ROWS = [
    Row(serial_number="1", product_name="Shoe", input_urls=["http://in/a.jpg", "http://in/b.jpg"]),
    Row(
        serial_number="2",
        product_name='=HYPERLINK("http://evil","x")',
        input_urls=["http://in/c.jpg", "http://in/d.jpg", "http://in/e.jpg"],
    ),
]


# Event builders --------------------------------------------------------------------


def received(request_id: str, rows: list[Row] = ROWS) -> CloudEvent:
    return events.received(request_id, rows)


def processed(request_id: str, row: int, position: int, *, ok: bool = True) -> CloudEvent:
    url = ROWS[row].input_urls[position] if row < len(ROWS) else "http://in/x.jpg"
    return events.processed(request_id, row, position, input_url=url, ok=ok)


def completed(request_id: str, ok: int, failed: int) -> CloudEvent:
    return events.completed(request_id, ok, failed)


def all_images(request_id: str, failed: set[tuple[int, int]] = frozenset()) -> list[CloudEvent]:
    return events.processed_for(request_id, ROWS, failed)


# Harness ---------------------------------------------------------------------------


def running(settings: Settings) -> AbstractAsyncContextManager[tuple[httpx.AsyncClient, Bus]]:
    return serving_with_bus(create_app(settings), settings, "http://status")


async def poll(
    client: httpx.AsyncClient, path: str, until: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """Poll the status until `until` holds; fail with the last answer after a while."""
    last: Any = None
    for _ in range(300):
        response = await client.get(path)
        if response.status_code == 200:
            last = response.json()
            if until(last):
                return last
        else:
            last = (response.status_code, response.text)
        await asyncio.sleep(0.05)
    raise AssertionError(f"condition never held; last answer: {last}")


def finished(body: dict[str, Any]) -> bool:
    """Final status, and every image outcome visible in the products."""
    outcomes = sum(
        url is not None or err is not None
        for product in body["products"]
        for url, err in zip(product["output_urls"], product["errors"], strict=True)
    )
    return body["status"] in ("completed", "error") and outcomes == body["progress"]["total"]


async def drain(client: httpx.AsyncClient, bus: Bus) -> None:
    """Wait until everything published so far is stored.

    The queue delivers in order and the service writes in delivery order, so once a
    sentinel published last is visible, every event before it has been applied.
    """
    sentinel = new_request_id()
    await bus.publish(received(sentinel))
    await poll(client, f"/status/{sentinel}", lambda b: True)


EXPECTED_PRODUCTS = [
    {
        "serial_number": "1",
        "product_name": "Shoe",
        "input_urls": ["http://in/a.jpg", "http://in/b.jpg"],
        "output_urls": ["http://media/{id}/0-0.jpg", "http://media/{id}/0-1.jpg"],
        "errors": [None, None],
        "attempts": [1, 1],
        "reused": [None, None],
    },
    {
        "serial_number": "2",
        "product_name": '=HYPERLINK("http://evil","x")',
        "input_urls": ["http://in/c.jpg", "http://in/d.jpg", "http://in/e.jpg"],
        "output_urls": ["http://media/{id}/1-0.jpg", None, "http://media/{id}/1-2.jpg"],
        "errors": [None, {"code": "download_failed", "message": "HTTP 404"}, None],
        "attempts": [1, 3, 1],
        "reused": [None, None, None],
    },
]


def expected_products(request_id: str) -> list[dict[str, Any]]:
    products = []
    for product in EXPECTED_PRODUCTS:
        urls = [u.replace("{id}", request_id) if u else u for u in product["output_urls"]]
        products.append({**product, "output_urls": urls})
    return products


def assert_final_completed(body: dict[str, Any], request_id: str) -> None:
    assert body["request_id"] == request_id
    assert body["status"] == "completed"
    assert body["progress"] == {"total": 5, "ok": 4, "failed": 1}
    assert body["products"] == expected_products(request_id)
    assert body["error_message"] == "1 of 5 images failed"
    assert datetime.fromisoformat(body["created_at"]) == T0
    assert datetime.fromisoformat(body["updated_at"]) == T0 + timedelta(minutes=1)


# Tests -----------------------------------------------------------------------------


async def test_lifecycle_in_order(settings: Settings) -> None:
    request_id = new_request_id()
    path = f"/status/{request_id}"
    async with running(settings) as (client, bus):
        assert (await client.get(path)).status_code == 404

        await bus.publish(received(request_id))
        body = await poll(client, path, lambda b: True)
        assert body["status"] == "received"
        assert body["progress"] == {"total": 5, "ok": 0, "failed": 0}
        assert body["products"][0]["output_urls"] == [None, None]
        assert body["error_message"] is None
        assert body["created_at"] == body["updated_at"]
        assert body["options"] == Options().model_dump()
        assert body["bytes"] == {"images": 0, "input": 0, "output": 0, "ratio": None}

        images = all_images(request_id, failed={(1, 1)})
        await bus.publish_many(images[:3])  # 0-0, 0-1, 1-0: all ok
        body = await poll(client, path, lambda b: b["progress"]["ok"] == 3)
        assert body["status"] == "processing"
        assert body["progress"] == {"total": 5, "ok": 3, "failed": 0}
        assert body["products"][1]["output_urls"] == [
            f"http://media/{request_id}/1-0.jpg",
            None,
            None,
        ]

        await bus.publish_many(images[3:])
        # publish_many sends concurrently: wait for both outcomes (ok + failed == total).
        body = await poll(client, path, lambda b: sum(b["progress"].values()) == 10)
        assert body["status"] == "processing"
        assert body["progress"] == {"total": 5, "ok": 4, "failed": 1}
        # Each stored image: 1,000 bytes in, 300 out (tests/support/events.py).
        assert body["bytes"] == {"images": 4, "input": 4000, "output": 1200, "ratio": 0.3}

        await bus.publish(completed(request_id, ok=4, failed=1))
        body = await poll(client, path, lambda b: b["status"] == "completed")
        assert_final_completed(body, request_id)


async def test_out_of_order_delivery_gives_the_same_result(settings: Settings) -> None:
    request_id = new_request_id()
    path = f"/status/{request_id}"
    async with running(settings) as (client, bus):
        images = all_images(request_id, failed={(1, 1)})
        await bus.publish(completed(request_id, ok=4, failed=1))
        await bus.publish_many(list(reversed(images)))
        await drain(client, bus)
        # Known only from image outcomes: not shown until the rows arrive.
        assert (await client.get(path)).status_code == 404

        await bus.publish(received(request_id))
        body = await poll(client, path, finished)
        assert_final_completed(body, request_id)


async def test_duplicates_are_not_counted_twice(settings: Settings) -> None:
    request_id = new_request_id()
    path = f"/status/{request_id}"
    async with running(settings) as (client, bus):
        images = all_images(request_id, failed={(1, 1)})
        await bus.publish_many([received(request_id), *images[:2], *images[:2]])
        await bus.publish(received(request_id))
        body = await poll(client, path, lambda b: b["progress"]["ok"] == 2)
        await bus.publish_many([*images, *images, *images[2:]])
        await bus.publish_many([completed(request_id, ok=4, failed=1)] * 2)
        body = await poll(client, path, finished)
        assert_final_completed(body, request_id)
        # Redeliveries of an image after completion change nothing either.
        await bus.publish_many(images)
        await bus.publish(completed(request_id, ok=4, failed=1))
        await drain(client, bus)
        assert_final_completed((await client.get(path)).json(), request_id)


async def test_all_images_failed_is_an_error(settings: Settings) -> None:
    request_id = new_request_id()
    path = f"/status/{request_id}"
    failed = {(r, p) for r, row in enumerate(ROWS) for p in range(len(row.input_urls))}
    async with running(settings) as (client, bus):
        await bus.publish(received(request_id))
        await bus.publish_many(all_images(request_id, failed=failed))
        await bus.publish(completed(request_id, ok=0, failed=5))
        body = await poll(client, path, finished)
        assert body["status"] == "error"
        assert body["progress"] == {"total": 5, "ok": 0, "failed": 5}
        assert "no image could be processed" in body["error_message"]
        for product in body["products"]:
            assert all(url is None for url in product["output_urls"])
            assert all(err["code"] == "download_failed" for err in product["errors"])


async def test_output_csv_is_aligned_and_formula_safe(settings: Settings) -> None:
    request_id = new_request_id()
    path = f"/status/{request_id}"
    async with running(settings) as (client, bus):
        assert (await client.get(f"{path}/output.csv")).status_code == 404
        await bus.publish(received(request_id))
        await bus.publish_many(all_images(request_id, failed={(1, 1)}))
        await bus.publish(completed(request_id, ok=4, failed=1))
        await poll(client, path, finished)

        response = await client.get(f"{path}/output.csv")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/csv")
        assert response.headers["content-disposition"] == f'attachment; filename="{request_id}.csv"'
        lines = list(csv.reader(io.StringIO(response.text)))
        assert lines == [
            ["S. No.", "Product Name", "Input Image Urls", "Output Image Urls"],
            [
                "1",
                "Shoe",
                "http://in/a.jpg,http://in/b.jpg",
                f"http://media/{request_id}/0-0.jpg,http://media/{request_id}/0-1.jpg",
            ],
            [
                "2",
                # Neutralised: a spreadsheet shows it as text instead of running it.
                '\'=HYPERLINK("http://evil","x")',
                "http://in/c.jpg,http://in/d.jpg,http://in/e.jpg",
                # The failed image keeps its (empty) place.
                f"http://media/{request_id}/1-0.jpg,,http://media/{request_id}/1-2.jpg",
            ],
        ]


async def test_output_csv_of_unfinished_request_is_partial(settings: Settings) -> None:
    request_id = new_request_id()
    path = f"/status/{request_id}"
    async with running(settings) as (client, bus):
        await bus.publish(received(request_id))
        await bus.publish(processed(request_id, 0, 1))
        await poll(client, path, lambda b: b["progress"]["ok"] == 1)
        response = await client.get(f"{path}/output.csv")
        assert response.status_code == 200
        assert response.headers["x-imgpipe-status"] == "processing"
        rows = list(csv.reader(io.StringIO(response.text)))[1:]
        assert [row[3] for row in rows] == [f",http://media/{request_id}/0-1.jpg", ",,"]


async def test_media_files_are_served_publicly(settings: Settings) -> None:
    settings.api_keys = ["k"]
    async with running(settings) as (client, _bus):
        target = settings.media_dir / "req-1" / "0-0.jpg"
        target.parent.mkdir(parents=True)
        target.write_bytes(b"\xff\xd8jpeg bytes")
        response = await client.get("/media/req-1/0-0.jpg")
        assert response.status_code == 200
        assert response.content == b"\xff\xd8jpeg bytes"
        assert response.headers["content-type"] == "image/jpeg"
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["cache-control"] == "public, max-age=86400"
        assert (await client.get("/media/req-1/missing.jpg")).status_code == 404
        for name, media_type in (("0-1.webp", "image/webp"), ("0-2.avif", "image/avif")):
            (target.parent / name).write_bytes(b"image bytes")
            served = await client.get(f"/media/req-1/{name}")
            assert served.headers["content-type"] == media_type
        shared = settings.media_dir / "objects" / f"{'ab' * 32}.jpg"  # a shared output
        shared.parent.mkdir()
        shared.write_bytes(b"\xff\xd8shared")
        served = await client.get(f"/media/objects/{shared.name}")
        assert served.status_code == 200 and served.content == b"\xff\xd8shared"
        assert served.headers["content-type"] == "image/jpeg"
        (settings.data_dir / "secret.txt").write_text("not media")
        assert (await client.get("/media/..%2fsecret.txt")).status_code == 404


async def test_api_key_guards_status_routes(settings: Settings) -> None:
    settings.api_keys = ["k"]
    request_id = new_request_id()
    path = f"/status/{request_id}"
    async with running(settings) as (client, bus):
        await bus.publish(received(request_id))
        assert (await client.get(path)).status_code == 401
        assert (await client.get(f"{path}/output.csv")).status_code == 401
        assert (await client.get(path, headers={"Authorization": "Bearer nope"})).status_code == 401
        client.headers["Authorization"] = "Bearer k"
        body = await poll(client, path, lambda b: True)
        assert body["status"] == "received"
        assert (await client.get(f"{path}/output.csv")).status_code == 200
        # Health stays open for probes.
        client.headers.pop("Authorization")
        assert (await client.get("/healthz")).status_code == 200


async def test_unknown_id_is_404_json_and_service_is_ready(settings: Settings) -> None:
    async with running(settings) as (client, _bus):
        response = await client.get("/status/nope")
        assert response.status_code == 404
        assert response.json() == {"detail": "unknown request nope"}
        ready = await client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["checks"] == {"broker": True, "database": True}
        assert (await client.get("/docs")).status_code == 200


async def test_a_bad_write_fails_alone_in_its_batch(settings: Settings) -> None:
    """Writes are batched; one that the database refuses must not fail its neighbours."""
    mongo = connect(settings)
    repository = StatusRepository(service_database(mongo, settings, "status"))
    writer: BatchWriter = BatchWriter(repository.write)
    writer.start()
    try:
        good = [Change(f"good-{n}", {"received": True, "n": n}, T0) for n in range(5)]
        bad = Change("bad", {"_id": "other"}, T0)  # refused: _id is immutable
        results = await asyncio.gather(
            *(writer.submit(change) for change in [*good[:2], bad, *good[2:]]),
            return_exceptions=True,
        )
        assert [isinstance(result, Exception) for result in results] == [
            False,
            False,
            True,
            False,
            False,
            False,
        ]
        for n in range(5):
            assert (await repository.get(f"good-{n}"))["n"] == n
    finally:
        await writer.close()
        await mongo.close()


async def test_the_request_s_options_are_shown(settings: Settings) -> None:
    request_id = new_request_id()
    options = Options(quality=70, format="webp", max_side=800, progressive=True)
    async with running(settings) as (client, bus):
        await bus.publish(events.received(request_id, ROWS, options=options))
        body = await poll(client, f"/status/{request_id}", lambda b: True)
    assert body["options"] == {
        "quality": 70,
        "format": "webp",
        "max_side": 800,
        "progressive": True,
    }


async def test_the_request_s_trace_is_shown(settings: Settings) -> None:
    traced, untraced = new_request_id(), new_request_id()
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    async with running(settings) as (client, bus):
        event = received(traced).model_copy(update={"traceparent": traceparent})
        await bus.publish(event)
        await bus.publish(received(untraced))  # published outside any span: an old event
        body = await poll(client, f"/status/{traced}", lambda b: True)
        assert body["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
        body = await poll(client, f"/status/{untraced}", lambda b: True)
        assert body["trace_id"] is None


async def test_reused_outputs_are_shown_per_image_and_counted(settings: Settings) -> None:
    request_id = new_request_id()
    reasons = {(0, 0): "not_modified", (0, 1): "not_modified", (1, 2): "same_bytes"}
    images = all_images(request_id, failed={(1, 1)})
    for event in images:
        reason = reasons.get((event.data.row_index, event.data.position))
        event.data = event.data.model_copy(update={"reused": reason})
    async with running(settings) as (client, bus):
        await bus.publish(received(request_id))
        await bus.publish_many(images)
        await bus.publish(completed(request_id, ok=4, failed=1))
        body = await poll(client, f"/status/{request_id}", finished)
    assert [product["reused"] for product in body["products"]] == [
        ["not_modified", "not_modified"],
        [None, None, "same_bytes"],
    ]
    assert body["reused"] == {"images": 3, "not_modified": 2, "same_bytes": 1}
