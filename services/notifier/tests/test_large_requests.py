"""The final webhook of a large request stays small: totals and links, not products.

Against a real database, through the handlers (the broker adds nothing here): the
stored delivery body is the exact text every attempt sends.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from imgpipe.contracts import mongo
from imgpipe.contracts.events import (
    CloudEvent,
    Counts,
    ImageError,
    ImageProcessed,
    RequestCompleted,
    RequestReceived,
    Row,
    image_key,
)
from imgpipe.contracts.settings import Settings
from imgpipe.notifier.adapters.repository import NotifierRepository
from imgpipe.notifier.adapters.requests import ImageDoc, Requests
from imgpipe.notifier.adapters.requests import Row as StoredRow
from imgpipe.notifier.config import NotifierConfig
from imgpipe.notifier.handlers import Deps, handle_event
from tests.support.events import T0

HOOK = "http://hook.invalid/x"
LIMIT = NotifierConfig().max_products_images
# What the README promises for a webhook without products (it is ~450 bytes).
SMALL_WEBHOOK_BYTES = 1024


class WatchedRequests(Requests):
    """The real request facts, noting whether every row or outcome was loaded."""

    loaded: list[str]

    async def load_rows(self, request_id: str) -> list[StoredRow]:
        self.loaded.append("rows")
        return await super().load_rows(request_id)

    async def load_images(self, request_id: str) -> list[ImageDoc]:
        self.loaded.append("images")
        return await super().load_images(request_id)


@pytest.fixture
async def repo(settings: Settings) -> AsyncIterator[NotifierRepository]:
    client = mongo.connect(settings)
    db = mongo.service_database(client, settings, "notifier")
    repository = NotifierRepository(db)
    repository.requests = WatchedRequests(db)
    repository.requests.loaded = []
    await repository.ensure_indexes()
    try:
        yield repository
    finally:
        await client.close()


def event(data: Any) -> CloudEvent:
    return CloudEvent.wrap(data, source="test", id=uuid.uuid4().hex)


def rows_of(images: int) -> list[Row]:
    """Rows of two images (one more row of one when odd), URLs of a real catalogue's length."""
    urls = [f"https://cdn.example.com/catalogue/2026/{n:06d}.jpg?v=1" for n in range(images)]
    return [
        Row(serial_number=str(n + 1), product_name=f"Product {n + 1}", input_urls=urls[i : i + 2])
        for n, i in enumerate(range(0, images, 2))
    ]


def outcomes(request_id: str, rows: list[Row]) -> list[ImageProcessed]:
    """Every image ok but one in 50, which failed after four attempts."""
    found = []
    for r, row in enumerate(rows):
        for p, url in enumerate(row.input_urls):
            key = image_key(r, p)
            ok = (r + p) % 50 != 7
            found.append(
                ImageProcessed(
                    request_id=request_id,
                    image_key=key,
                    row_index=r,
                    position=p,
                    input_url=url,
                    outcome="ok" if ok else "failed",
                    output_url=f"http://127.0.0.1:8002/media/{request_id}/{key}.jpg"
                    if ok
                    else None,
                    bytes_in=1000 if ok else None,
                    bytes_out=300 if ok else None,
                    error=None if ok else ImageError(code="http_error", message="HTTP 404"),
                    attempts=1 if ok else 4,
                )
            )
    return found


async def finish(repo: NotifierRepository, settings: Settings, images: int) -> dict[str, Any]:
    """A whole request of `images` images through the handlers; its final webhook body."""
    deps = Deps(repo, settings, NotifierConfig(completion_grace=30.0))
    request_id = uuid.uuid4().hex
    rows = rows_of(images)
    received = RequestReceived(
        request_id=request_id, rows=rows, image_count=images, webhook_url=HOOK, received_at=T0
    )
    await handle_event(event(received), deps)
    stored = outcomes(request_id, rows)
    for start in range(0, len(stored), 500):  # as the image batches store them
        await repo.requests.store_images(stored[start : start + 500])
    failed = sum(image.outcome == "failed" for image in stored)
    counts = Counts(total=images, ok=images - failed, failed=failed)
    done = RequestCompleted(
        request_id=request_id, status="completed", counts=counts, completed_at=T0
    )
    await handle_event(event(done), deps)
    [final] = await repo.deliveries.collection.find(
        {"request_id": request_id, "event_type": "request.completed"}
    ).to_list()
    body: str = final["body"]
    return {"request_id": request_id, "bytes": len(body.encode()), "payload": json.loads(body)}


async def test_a_large_request_s_final_webhook_carries_totals_and_links_only(
    repo: NotifierRepository, settings: Settings
) -> None:
    images = 3 * LIMIT + 1
    final = await finish(repo, settings, images)
    payload, request_id = final["payload"], final["request_id"]
    assert final["bytes"] < SMALL_WEBHOOK_BYTES
    assert "products" not in payload
    assert payload["products_omitted"] is True
    base = f"http://127.0.0.1:8002/status/{request_id}"
    assert payload["status_url"] == base
    assert payload["output_csv_url"] == f"{base}/output.csv"
    failed = sum(image.outcome == "failed" for image in outcomes(request_id, rows_of(images)))
    assert payload["counts"] == {"total": images, "ok": images - failed, "failed": failed}
    ok = images - failed
    assert payload["bytes"] == {"images": ok, "input": 1000 * ok, "output": 300 * ok, "ratio": 0.3}
    # Nothing read every row or outcome into memory: the totals were tallied from a cursor.
    assert repo.requests.loaded == []  # type: ignore[attr-defined]


async def test_a_request_at_the_limit_keeps_its_products(
    repo: NotifierRepository, settings: Settings
) -> None:
    final = await finish(repo, settings, LIMIT)
    payload = final["payload"]
    assert "products_omitted" not in payload
    assert len(payload["products"]) == LIMIT // 2
    assert sum(len(p["output_urls"]) for p in payload["products"]) == LIMIT
    assert payload["products"][6]["errors"][1] == {"code": "http_error", "message": "HTTP 404"}
    # The largest final webhook with products: about 200 bytes an image with these URLs.
    assert final["bytes"] < 250 * LIMIT
