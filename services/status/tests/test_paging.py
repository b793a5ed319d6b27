"""Pages of products: GET /status/{id}?limit=&after= and the streamed output CSV.

Against the real database. Events are written as the service writes them (`change_for`
and `StatusRepository.write`, through the running app's repository), so a request of
thousands of images is stored in a moment; the read cache is off (TTL 0), so each read
sees every write before it, as a poller does once a TTL has passed.
"""

from __future__ import annotations

import base64
import csv
import io
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from imgpipe.contracts.events import CloudEvent, Row, Tally, image_key
from imgpipe.contracts.settings import Settings
from imgpipe.status.adapters.repository import StatusRepository
from imgpipe.status.app import create_app
from imgpipe.status.config import ReadCacheConfig
from imgpipe.status.handlers import change_for
from imgpipe.status.views import DEFAULT_LIMIT, encode_cursor
from tests.support import events
from tests.support.apps import serving
from tests.support.events import new_request_id

# 2,500 products of one to three images: three pages at the default limit.
ROWS = [
    Row(
        serial_number=str(n + 1),
        product_name=f"Product {n + 1}",
        input_urls=[f"http://in/{n}-{p}.jpg" for p in range(1 + n % 3)],
    )
    for n in range(2500)
]
KEYS = [(r, p) for r, row in enumerate(ROWS) for p in range(len(row.input_urls))]


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, StatusRepository]]:
    app = create_app(settings, ReadCacheConfig(ttl=0, final_ttl=0))
    async with serving(app, "http://status") as client:
        yield client, app.state.runtime.repository


async def store(repository: StatusRepository, stored: list[CloudEvent]) -> None:
    for start in range(0, len(stored), 500):
        await repository.write([change_for(event) for event in stored[start : start + 500]])


def outcomes(request_id: str, rows: list[Row], keys: list[tuple[int, int]]) -> list[CloudEvent]:
    return [
        events.processed(request_id, r, p, input_url=rows[r].input_urls[p], ok=(r + p) % 97 != 5)
        for r, p in keys
    ]


async def every_page(
    client: httpx.AsyncClient, path: str, limit: int, between: Any = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(every page's answer, their products in order), following `next`; `between` runs
    after each page is read."""
    answers: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": limit}
    while True:
        response = await client.get(path, params=params)
        assert response.status_code == 200, response.text
        answers.append(response.json())
        if between is not None:
            await between(len(answers))
        if answers[-1]["next"] is None:
            return answers, [p for answer in answers for p in answer["products"]]
        params = {"limit": limit, "after": answers[-1]["next"]}


async def test_pages_give_every_product_once_in_order_while_outcomes_arrive(
    settings: Settings,
) -> None:
    request_id = new_request_id()
    path = f"/status/{request_id}"
    images = outcomes(request_id, ROWS, KEYS)
    batches = [images[n::4] for n in range(4)]  # spread over every page
    async with running(settings) as (client, repository):
        await store(repository, [events.received(request_id, ROWS)])

        async def more_outcomes(pages_read: int) -> None:
            if pages_read <= len(batches):
                await store(repository, batches[pages_read - 1])

        answers, products = await every_page(client, path, 700, more_outcomes)
        assert [p["serial_number"] for p in products] == [row.serial_number for row in ROWS]
        assert [p["input_urls"] for p in products] == [row.input_urls for row in ROWS]
        assert [len(a["products"]) for a in answers] == [700, 700, 700, 400]
        assert {(a["products_total"], a["limit"]) for a in answers} == {(len(ROWS), 700)}
        # Outcomes stored between reads show on the pages read after them: page k sees
        # the batches stored before it (image i is in batch i % 4).
        batch_of = {(r, p): i % len(batches) for i, (r, p) in enumerate(KEYS)}
        for k, answer in enumerate(answers, start=1):
            start = 700 * (k - 1)
            shown = {
                (start + n, p)
                for n, product in enumerate(answer["products"])
                for p, (url, error) in enumerate(
                    zip(product["output_urls"], product["errors"], strict=True)
                )
                if url is not None or error is not None
            }
            on_page = {(r, p) for r, p in KEYS if start <= r < start + 700}
            assert shown == {key for key in on_page if batch_of[key] < k - 1}
        assert answers[0]["status"] == "received"
        assert answers[-1]["status"] == "processing"

        # Once every outcome is in, the pages hold them all, each with its own key.
        await store(repository, [events.completed(request_id, ok=len(KEYS))])
        answers, products = await every_page(client, path, DEFAULT_LIMIT)
        assert [len(a["products"]) for a in answers] == [1000, 1000, 500]
        expected = {
            image_key(r, p): f"http://media/{request_id}/{image_key(r, p)}.jpg"
            for r, p in KEYS
            if (r + p) % 97 != 5
        }
        shown = {
            image_key(r, p): url
            for r, product in enumerate(products)
            for p, url in enumerate(product["output_urls"])
            if url is not None
        }
        assert shown == expected
        first = answers[0]
        assert first["progress"]["total"] == len(KEYS)
        assert first["bytes"]["images"] == len(expected)  # totals are the whole request's


async def test_a_large_running_request_shows_the_processors_tally(settings: Settings) -> None:
    """Progress, bytes and reuse of a request larger than a page come from the tally the
    processor sends with each ImageProcessed (its highest values, in any order), which
    may run ahead of the outcomes this service has stored; once final, they are counted
    from the outcomes."""
    request_id = new_request_id()
    path = f"/status/{request_id}"
    # Every other image of the first 1,200 arrived: the processor had counted all 1,200,
    # 7 failed, 25 of the stored reused unchanged from an earlier upload.
    arrived = KEYS[:1200:2]
    tallies = [
        Tally(
            ok=n * 2 - n // 200,
            failed=n // 200,
            stored=n * 2 - n // 200,
            bytes_in=1000 * (n * 2 - n // 200),
            bytes_out=300 * (n * 2 - n // 200),
            not_modified=n // 24,
        )
        for n in range(1, len(arrived) + 1)
    ]
    images = [
        events.processed(request_id, r, p, input_url=ROWS[r].input_urls[p], tally=tally)
        for (r, p), tally in zip(arrived, tallies, strict=True)
    ]
    async with running(settings) as (client, repository):
        await store(repository, [events.received(request_id, ROWS)])
        await store(repository, images[::-1])  # the last tally first
        body = (await client.get(path)).json()
        assert body["status"] == "processing"
        assert body["progress"] == {"total": len(KEYS), "ok": 1197, "failed": 3}
        assert body["bytes"] == {
            "images": 1197,
            "input": 1_197_000,
            "output": 359_100,
            "ratio": 0.3,
        }
        assert body["reused"] == {"images": 25, "not_modified": 25, "same_bytes": 0}
        assert body["products_total"] == len(ROWS)
        # The first page shows the outcomes stored for its rows, and only those.
        shown = {
            (r, p)
            for r, product in enumerate(body["products"])
            for p, url in enumerate(product["output_urls"])
            if url is not None
        }
        assert shown == {(r, p) for r, p in arrived if r < DEFAULT_LIMIT}
        listed = (await client.get("/requests", params={"limit": 200})).json()["items"]
        item = next(item for item in listed if item["request_id"] == request_id)
        assert (item["status"], item["progress"]) == ("processing", body["progress"])

        # Final: counted from the outcomes stored (the rest never came, in this test).
        await store(repository, [events.completed(request_id, ok=len(KEYS))])
        final = (await client.get(path)).json()
        assert final["status"] == "completed"
        assert final["bytes"]["images"] == len(arrived)
        assert final["reused"]["images"] == 0


async def test_a_large_requests_retry_round_shows_its_own_tally(settings: Settings) -> None:
    """A retry round's tally (whole-request counts once the round counted an image)
    replaces the finished round's counts; round 0's tally, however high, no longer
    shows."""
    request_id = new_request_id()
    path = f"/status/{request_id}"
    failed = KEYS[:10]  # round 0: these failed, the rest were stored
    done = [
        events.processed(request_id, r, p, input_url=ROWS[r].input_urls[p], ok=(r, p) not in failed)
        for r, p in KEYS
    ]
    done[-1] = events.processed(
        request_id,
        *KEYS[-1],
        input_url=ROWS[KEYS[-1][0]].input_urls[KEYS[-1][1]],
        tally=Tally(ok=len(KEYS) - 10, failed=10, stored=len(KEYS) - 10),
    )
    retried = [events.retry_started(request_id, 1, [image_key(r, p) for r, p in failed])]
    # Round 1 counted 4 of the 10: 2 more stored, 2 failed again, 6 still running.
    round_one = events.processed_in_round(request_id, *failed[0], 1)
    tally = Tally(ok=len(KEYS) - 8, failed=2, stored=len(KEYS) - 8)
    round_one.data.tally = tally
    async with running(settings) as (client, repository):
        await store(repository, [events.received(request_id, ROWS), *done])
        await store(repository, [events.completed(request_id, ok=len(KEYS) - 10, failed=10)])
        assert (await client.get(path)).json()["status"] == "completed"
        await store(repository, [*retried, round_one])
        body = (await client.get(path)).json()
        assert (body["status"], body["round"]) == ("processing", 1)
        assert body["progress"] == {"total": len(KEYS), "ok": len(KEYS) - 8, "failed": 2}
        assert body["bytes"]["images"] == len(KEYS) - 8


async def test_the_first_page_is_the_default_answer_and_pages_have_etags(
    settings: Settings,
) -> None:
    request_id = new_request_id()
    path = f"/status/{request_id}"
    async with running(settings) as (client, repository):
        await store(repository, [events.received(request_id, ROWS)])
        default = await client.get(path)
        explicit = await client.get(path, params={"limit": DEFAULT_LIMIT})
        assert default.json() == explicit.json()
        body = default.json()
        assert len(body["products"]) == DEFAULT_LIMIT
        assert body["next"] == encode_cursor(DEFAULT_LIMIT)

        second = await client.get(path, params={"after": body["next"]})
        assert second.headers["content-encoding"] == "gzip"
        assert second.json()["products"][0]["serial_number"] == str(DEFAULT_LIMIT + 1)
        again = await client.get(
            path, params={"after": body["next"]}, headers={"If-None-Match": second.headers["etag"]}
        )
        assert again.status_code == 304


async def test_a_small_request_has_one_page_with_everything(settings: Settings) -> None:
    request_id = new_request_id()
    rows = ROWS[:3]
    async with running(settings) as (client, repository):
        await store(repository, [events.received(request_id, rows)])
        body = (await client.get(f"/status/{request_id}")).json()
        assert [p["serial_number"] for p in body["products"]] == ["1", "2", "3"]
        assert (body["products_total"], body["limit"], body["next"]) == (3, DEFAULT_LIMIT, None)
        # A smaller limit pages it too.
        answers, products = await every_page(client, f"/status/{request_id}", 2)
        assert [len(a["products"]) for a in answers] == [2, 1]
        assert products == body["products"]


def cursor_of(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "after",
    [
        "garbage!",
        "x" * 100,
        cursor_of({"row": -1}),
        cursor_of({"row": 0}),
        cursor_of({"row": "5"}),
        cursor_of({"row": 5, "extra": 1}),
        cursor_of([5]),
        cursor_of({"row": 4}),  # past the end of a three-product request
    ],
)
async def test_a_bad_cursor_is_a_422_that_says_so(settings: Settings, after: str) -> None:
    request_id = new_request_id()
    async with running(settings) as (client, repository):
        await store(repository, [events.received(request_id, ROWS[:3])])
        response = await client.get(f"/status/{request_id}", params={"after": after})
        assert response.status_code == 422
        assert response.json()["detail"].startswith("after: ")


async def test_a_limit_out_of_range_is_a_422(settings: Settings) -> None:
    request_id = new_request_id()
    async with running(settings) as (client, repository):
        await store(repository, [events.received(request_id, ROWS[:3])])
        for limit in (0, DEFAULT_LIMIT + 1):
            response = await client.get(f"/status/{request_id}", params={"limit": limit})
            assert response.status_code == 422


async def test_the_output_csv_of_a_large_request_is_streamed_whole_and_in_order(
    settings: Settings,
) -> None:
    """1,500 products of two images, 3,000 images: past one page, so streamed."""
    request_id = new_request_id()
    rows = [
        Row(
            serial_number=str(n + 1),
            product_name=f"=Product {n + 1}",
            input_urls=[f"http://in/{n}-{p}.jpg" for p in range(2)],
        )
        for n in range(1500)
    ]
    keys = [(r, p) for r in range(len(rows)) for p in range(2)]
    async with running(settings) as (client, repository):
        await store(
            repository, [events.received(request_id, rows), *outcomes(request_id, rows, keys)]
        )
        await store(repository, [events.completed(request_id, ok=len(keys))])
        response = await client.get(f"/status/{request_id}/output.csv")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/csv")
        assert response.headers["x-imgpipe-status"] == "completed"
        assert "etag" not in response.headers  # written as it is read
        assert "content-length" not in response.headers
        lines = list(csv.reader(io.StringIO(response.text)))
        assert lines[0] == ["S. No.", "Product Name", "Input Image Urls", "Output Image Urls"]
        assert len(lines) == 1 + len(rows)
        for r, (line, row) in enumerate(zip(lines[1:], rows, strict=True)):
            outputs = [
                "" if (r + p) % 97 == 5 else f"http://media/{request_id}/{image_key(r, p)}.jpg"
                for p in range(2)
            ]
            assert line == [
                row.serial_number,
                "'" + row.product_name,
                ",".join(row.input_urls),
                ",".join(outputs),
            ]
