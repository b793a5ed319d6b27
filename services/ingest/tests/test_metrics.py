"""Ingest's /metrics after real uploads: accepted ones counted, refused ones not."""

from __future__ import annotations

from imgpipe.contracts.settings import Settings
from tests.support.metrics import moved, promtool_check, scrape

CSV = (
    "S. No.,Product Name,Input Image Urls\r\n"
    '1,Shirt,"https://img.example.com/a.jpg,https://img.example.com/b.jpg"\r\n'
    "2,Hat,https://img.example.com/c.jpg\r\n"
)


def form(body: str) -> dict:
    return {"files": {"file": ("products.csv", body.encode(), "text/csv")}}


async def test_accepted_uploads_and_http_requests_are_counted(
    settings: Settings, run_ingest, received_events
) -> None:
    async with run_ingest(settings) as (_, client):
        _, before = await scrape(client)
        assert (await client.post("/upload", **form(CSV))).status_code == 202
        assert (await client.post("/upload", **form("not,a,csv\r\n"))).status_code == 422
        await received_events.next()  # published before the scrape
        text, after = await scrape(client)

    assert moved(before, after, "imgpipe_requests_received_total") == 1
    assert moved(before, after, "imgpipe_images_received_total") == 3
    received = "io.imgpipe.request.received.v1"
    assert moved(before, after, "imgpipe_events_published_total", type=received) == 1
    http = "imgpipe_http_requests_total"
    assert moved(before, after, http, handler="/upload", method="POST", status="2xx") == 1
    assert moved(before, after, http, handler="/upload", method="POST", status="4xx") == 1
    assert "request_id" not in text  # no unbounded label
    promtool_check(text)
