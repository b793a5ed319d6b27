"""GET /requests against the real broker and database: the list, its pages and filter."""

from __future__ import annotations

import base64
from datetime import datetime, timedelta
from typing import Any

import httpx

from imgpipe.contracts.settings import Settings
from imgpipe.status.adapters.repository import Position
from imgpipe.status.listing import decode_cursor, encode_cursor
from tests.support import events
from tests.support.events import new_request_id

from .test_status import ROWS, all_images, completed, poll, processed, received, running

T0 = events.T0


async def everything(client: httpx.AsyncClient, limit: int, **params: str) -> list[list[str]]:
    """Every page of the list, as request ids, following `next` to the end."""
    pages: list[list[str]] = []
    query: dict[str, Any] = {"limit": limit, **params}
    while True:
        response = await client.get("/requests", params=query)
        assert response.status_code == 200, response.text
        body = response.json()
        pages.append([item["request_id"] for item in body["items"]])
        if body["next"] is None:
            return pages
        query["before"] = body["next"]


async def wait_listed(client: httpx.AsyncClient, count: int, **params: str) -> dict[str, Any]:
    return await poll(
        client,
        f"/requests?{httpx.QueryParams({'limit': 200, **params})}",
        lambda body: len(body["items"]) == count,
    )


async def test_pages_cover_every_request_once_newest_first(settings: Settings) -> None:
    # Three share one millisecond: the id breaks the tie, and a page may end inside it.
    times = [T0 + timedelta(seconds=n) for n in (1, 2, 3, 3, 3, 4, 5)]
    ids = [new_request_id() for _ in times]
    expected = [i for _, i in sorted(zip(times, ids, strict=True), reverse=True)]
    async with running(settings) as (client, bus):
        for request_id, at in zip(ids, times, strict=True):
            await bus.publish(events.received(request_id, ROWS, at=at))
        await wait_listed(client, 7)

        first = (await client.get("/requests", params={"limit": 3})).json()
        assert [item["request_id"] for item in first["items"]] == expected[:3]
        # A newer request arriving meanwhile does not shift the pages after the first.
        newer = new_request_id()
        await bus.publish(events.received(newer, ROWS, at=T0 + timedelta(hours=1)))
        await wait_listed(client, 8)
        rest = await everything(client, 3, before=first["next"])
        assert rest == [expected[3:6], expected[6:]]
        assert await everything(client, 3) == [[newer, *expected[:2]], expected[2:5], expected[5:]]

        item = first["items"][0]
    assert item == {
        "request_id": expected[0],
        "status": "received",
        "progress": {"total": 5, "ok": 0, "failed": 0},
        "created_at": item["created_at"],
        "updated_at": item["created_at"],
        "product_count": 2,
    }
    assert datetime.fromisoformat(item["created_at"]) == T0 + timedelta(seconds=5)


async def test_the_status_filter(settings: Settings) -> None:
    waiting, working, done, failed = (new_request_id() for _ in range(4))
    async with running(settings) as (client, bus):
        for n, request_id in enumerate((waiting, working, done, failed)):
            await bus.publish(events.received(request_id, ROWS, at=T0 + timedelta(seconds=n)))
        await bus.publish(processed(working, 0, 0))
        for event in all_images(done, failed={(1, 1)}):
            await bus.publish(event)
        await bus.publish(completed(done, ok=4, failed=1))
        for event in all_images(failed, failed={(r, p) for r in (0, 1) for p in range(3)}):
            await bus.publish(event)
        await bus.publish(completed(failed, ok=0, failed=5))
        await wait_listed(client, 1, status="error")
        await wait_listed(client, 1, status="processing")

        listed = {
            status: (await client.get("/requests", params={"status": status})).json()["items"]
            for status in ("received", "processing", "completed", "error", "cancelled")
        }
        everything_listed = (await client.get("/requests")).json()["items"]
    assert {status: [i["request_id"] for i in items] for status, items in listed.items()} == {
        "received": [waiting],
        "processing": [working],
        "completed": [done],
        "error": [failed],
        "cancelled": [],
    }
    assert [item["request_id"] for item in everything_listed] == [failed, done, working, waiting]
    # Status and progress as GET /status gives them.
    [in_progress] = listed["processing"]
    assert in_progress["progress"] == {"total": 5, "ok": 1, "failed": 0}
    assert datetime.fromisoformat(in_progress["updated_at"]) == processed(working, 0, 0).time
    [finished] = listed["completed"]
    assert finished["progress"] == {"total": 5, "ok": 4, "failed": 1}
    assert datetime.fromisoformat(finished["updated_at"]) == T0 + timedelta(minutes=1)


async def test_a_late_request_received_does_not_move_a_request_back(settings: Settings) -> None:
    request_id = new_request_id()
    async with running(settings) as (client, bus):
        await bus.publish(completed(request_id, ok=5, failed=0))
        await bus.publish(received(request_id))
        await wait_listed(client, 1, status="completed")
        assert (await client.get("/requests", params={"status": "received"})).json()["items"] == []


async def test_a_bad_cursor_or_limit_is_a_422(settings: Settings) -> None:
    forged = base64.urlsafe_b64encode(b'{"t": "yesterday", "id": "x"}').decode()
    async with running(settings) as (client, _bus):
        answers = [
            await client.get("/requests", params={"before": before})
            for before in ("not a cursor!", forged, "", "A" * 600)
        ]
        too_many = await client.get("/requests", params={"limit": 201})
        unknown_status = await client.get("/requests", params={"status": "lost"})
    for answer in answers:
        assert answer.status_code == 422, answer.text
        assert answer.json()["detail"].startswith("before: not a cursor from GET /requests")
    assert too_many.status_code == 422
    assert unknown_status.status_code == 422


def test_a_cursor_round_trips_to_the_millisecond() -> None:
    at = T0 + timedelta(milliseconds=7)
    cursor = encode_cursor(Position(at, "req-1"))
    assert "=" not in cursor and "+" not in cursor and "/" not in cursor
    assert decode_cursor(cursor) == Position(at, "req-1")


async def test_api_key_guards_the_list(settings: Settings) -> None:
    settings.api_keys = ["k"]
    async with running(settings) as (client, _bus):
        without = await client.get("/requests")
        wrong = await client.get("/requests", headers={"Authorization": "Bearer nope"})
        right = await client.get("/requests", headers={"Authorization": "Bearer k"})
    assert (without.status_code, wrong.status_code, right.status_code) == (401, 401, 200)
    assert right.json() == {"items": [], "next": None}
