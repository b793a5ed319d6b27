"""Incremental catalogues on the whole system, as real processes on the real broker and
database: yesterday's CSV uploaded again is answered from the host's 304s without a
decode, a changed picture alone is done again, refresh does everything anew, and
deleting requests removes a shared output only with the last one that uses it."""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from imgpipe.contracts.settings import Settings
from tests.support.images import jpeg_bytes
from tests.support.metrics import Samples, moved, value
from tests.support.remote_host import Behaviour, remote_host
from tests.support.system import System, running_system
from tests.test_manage_requests import FINAL, catalogue, upload, wait_for


def finished(client: httpx.Client, system: System, request_id: str) -> dict[str, Any]:
    url = f"{system.status_url}/status/{request_id}"
    return wait_for(client, url, lambda body: body["status"] in FINAL)


def output_csv_urls(client: httpx.Client, system: System, request_id: str) -> list[str]:
    answer = client.get(f"{system.status_url}/status/{request_id}/output.csv")
    assert answer.status_code == 200
    rows = csv.DictReader(io.StringIO(answer.text))
    return [url for row in rows for url in row["Output Image Urls"].split(",")]


def processor_metrics(client: httpx.Client, system: System) -> Samples:
    port = system.settings.processor_port
    text = client.get(f"http://127.0.0.1:{port}/metrics").text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.mark.timeout(300)
def test_yesterday_s_catalogue_again_costs_a_304_per_image(settings: Settings) -> None:
    with (
        remote_host(behaviour=Behaviour(etags=True)) as host,
        running_system(settings) as system,
        httpx.Client(timeout=30) as client,
    ):
        urls = [host.add(f"/img/{i}.jpg", jpeg_bytes(200, 150, seed=i)) for i in range(6)]
        products = catalogue(urls)
        first_id = upload(client, system, products)
        first = finished(client, system, first_id)
        assert first["status"] == "completed" and first["reused"]["images"] == 0
        first_outputs = output_csv_urls(client, system, first_id)
        before = processor_metrics(client, system)

        second_id = upload(client, system, products)
        second = finished(client, system, second_id)

        assert second["progress"] == {"total": 6, "ok": 6, "failed": 0}
        assert second["reused"] == {"images": 6, "not_modified": 6, "same_bytes": 0}
        assert [p["reused"] for p in second["products"]] == [["not_modified"] * 3] * 2
        asked = host.conditional()
        assert len(asked) == 6 and {seen.status for seen in asked} == {304}
        outputs = output_csv_urls(client, system, second_id)
        assert outputs == first_outputs
        assert all(client.get(url).status_code == 200 for url in outputs)
        after = processor_metrics(client, system)
        compressed = "imgpipe_compress_duration_seconds_count"
        assert value(after, compressed) == value(before, compressed), "nothing decoded"
        reused = "imgpipe_images_reused_total"
        assert moved(before, after, reused, reason="not_modified") == 6
        assert moved(before, after, "imgpipe_download_bytes_saved_total") == sum(
            len(host.files[f"/img/{i}.jpg"]) for i in range(6)
        )

        # One picture changes at its host: the third upload does that one alone again.
        host.files["/img/4.jpg"] = jpeg_bytes(200, 150, seed=44)
        third = finished(client, system, upload(client, system, products))
        assert third["reused"] == {"images": 5, "not_modified": 5, "same_bytes": 0}
        assert third["products"][1]["reused"] == ["not_modified", None, "not_modified"]
        assert third["products"][1]["output_urls"][1] != first_outputs[4]
        assert value(processor_metrics(client, system), compressed) == value(after, compressed) + 1

        # refresh=true: every image downloaded (no conditional request) and encoded anew.
        seen = len(host.seen)
        refreshed = finished(client, system, upload(client, system, products, refresh="true"))
        assert refreshed["reused"]["images"] == 0 and refreshed["progress"]["ok"] == 6
        fresh = host.seen[seen:]
        assert len(fresh) == 6 and all("if-none-match" not in s.headers for s in fresh)
        final = processor_metrics(client, system)
        assert value(final, compressed) == value(after, compressed) + 7

        # Deleting the first request leaves the outputs the others use; deleting every
        # request that uses an output removes its file.
        objects = settings.media_dir / "objects"
        assert len(list(objects.iterdir())) == 7  # six pictures, one of them changed
        assert client.delete(f"{system.ingest_url}/requests/{first_id}").status_code == 202
        wait_for_404(client, system, first_id)
        assert all(client.get(url).status_code == 200 for url in outputs)
        for request in (second_id, third["request_id"], refreshed["request_id"]):
            assert client.delete(f"{system.ingest_url}/requests/{request}").status_code == 202
        wait_until_empty(objects)
        assert all(client.get(url).status_code == 404 for url in outputs)


def wait_for_404(client: httpx.Client, system: System, request_id: str) -> None:
    url = f"{system.status_url}/status/{request_id}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and client.get(url).status_code != 404:
        time.sleep(0.1)
    assert client.get(url).status_code == 404
    time.sleep(0.5)  # the processor's delete of the same event


def wait_until_empty(folder: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(folder.iterdir()):
        time.sleep(0.1)
    assert list(folder.iterdir()) == []
