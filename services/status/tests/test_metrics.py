"""The status service's /metrics after real events and reads."""

from __future__ import annotations

import asyncio

from imgpipe.contracts.settings import Settings
from imgpipe.status.app import create_app
from tests.support import events
from tests.support.apps import serving_with_bus
from tests.support.metrics import moved, promtool_check, scrape

ROWS = events.rows_of([["http://in/a.jpg", "http://in/b.jpg"]])


async def test_consumed_events_and_status_reads_are_counted(settings: Settings) -> None:
    request_id = events.new_request_id()
    app = create_app(settings)
    async with serving_with_bus(app, settings, "http://status") as (client, bus):
        _, before = await scrape(client)
        await bus.publish_many(
            [
                events.received(request_id, ROWS),
                *events.processed_for(request_id, ROWS),
                events.completed(request_id, 2),
            ]
        )
        for _ in range(200):
            answer = await client.get(f"/status/{request_id}")
            if answer.status_code == 200 and answer.json()["status"] == "completed":
                break
            await asyncio.sleep(0.05)
        text, after = await scrape(client)

    consumed = "imgpipe_events_consumed_total"
    for event_type, count in (
        ("io.imgpipe.request.received.v1", 1),
        ("io.imgpipe.image.processed.v1", 2),
        ("io.imgpipe.request.completed.v1", 1),
    ):
        assert moved(before, after, consumed, queue="status", type=event_type) == count
    http = "imgpipe_http_requests_total"
    assert moved(before, after, http, handler="/status/{request_id}", method="GET", status="2xx")
    promtool_check(text)
