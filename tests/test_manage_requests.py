"""Managing requests on the whole system, as real processes on the real broker and
database: cancel a long request, retry the images whose host was down, delete a
request everywhere, and let the retention sweep delete old ones."""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from pymongo import MongoClient

from imgpipe.contracts.settings import Settings
from tests.support.http_server import LoopbackServer, Recorded, Response, loopback_server
from tests.support.images import jpeg_bytes
from tests.support.namespaces import SERVICES
from tests.support.remote_host import Behaviour, RemoteHost, Status, remote_host
from tests.support.system import System, running_system

FINAL = ("completed", "error", "cancelled")


def catalogue(urls: list[str], per_row: int = 3) -> bytes:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\r\n")
    writer.writerow(["S. No.", "Product Name", "Input Image Urls"])
    for row, start in enumerate(range(0, len(urls), per_row)):
        writer.writerow(
            [str(row + 1), f"Product {row + 1}", ",".join(urls[start : start + per_row])]
        )
    return text.getvalue().encode()


def upload(client: httpx.Client, system: System, csv_bytes: bytes, **data: str) -> str:
    answer = client.post(
        f"{system.ingest_url}/upload",
        files={"file": ("products.csv", csv_bytes, "text/csv")},
        data=data,
    )
    assert answer.status_code == 202, answer.text
    request_id: str = answer.json()["request_id"]
    return request_id


def wait_for(
    client: httpx.Client, url: str, done: Callable[[dict[str, Any]], bool], timeout: float = 120
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        answer = client.get(url)
        if answer.status_code == 200:
            body = answer.json()
            if done(body):
                return body
        time.sleep(0.1)
    raise AssertionError(f"timed out; last answer {body.get('status')}: {body.get('progress')}")


def webhooks(server: LoopbackServer) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []

    def receive(request: Recorded) -> Response:
        import json

        seen.append(json.loads(request.body))
        return Response(b"ok", 200)

    server.add("/hooks", receive)
    return seen


def documents_mentioning(settings: Settings, request_id: str) -> dict[str, list[dict[str, Any]]]:
    """Every document of every service's database whose id or request_id names it."""
    found: dict[str, list[dict[str, Any]]] = {}
    with MongoClient(settings.mongodb_url) as client:
        for service in SERVICES:
            database = client[settings.database_name(service)]
            for name in database.list_collection_names():
                for doc in database[name].find():
                    if request_id in str(doc.get("_id")) or doc.get("request_id") == request_id:
                        found.setdefault(f"{service}.{name}", []).append(doc)
    return found


@pytest.fixture
def slow_host() -> Iterator[RemoteHost]:
    with remote_host(behaviour=Behaviour(latency=0.3)) as host:
        yield host


@pytest.mark.timeout(300)
def test_a_long_request_cancelled_midway_starts_no_image_after_the_cancel(
    settings: Settings, slow_host: RemoteHost
) -> None:
    urls = [slow_host.add(f"/img/{i}.jpg", jpeg_bytes(320, 240, seed=i)) for i in range(60)]
    with (
        loopback_server() as server,
        running_system(settings, IMGPIPE_PER_HOST_CONNECTIONS="2") as system,
        httpx.Client(timeout=30) as client,
    ):
        hooks = webhooks(server)
        request_id = upload(client, system, catalogue(urls), webhook_url=server.url("/hooks"))
        status_url = f"{system.status_url}/status/{request_id}"
        wait_for(client, status_url, lambda body: body["progress"]["ok"] >= 4)

        answer = client.post(f"{system.ingest_url}/requests/{request_id}/cancel")
        assert answer.status_code == 202, answer.text
        assert answer.json()["command"] == "cancel"
        final = wait_for(client, status_url, lambda body: body["status"] == "cancelled")
        cancelled_at = time.monotonic()
        time.sleep(3)  # what was in progress ends; nothing new may start

        # Downloads in progress when the cancel was seen may finish; none starts after.
        # The host records a request after its latency, so a late start shows as later.
        late = [seen for seen in slow_host.seen if seen.at > cancelled_at + 0.3 + 0.5]
        assert late == [], f"{len(late)} downloads started after the cancel"
        downloaded = len(slow_host.seen)
        assert downloaded < 40, "the cancel came too late to show anything"
        after = client.get(status_url).json()
        assert after["status"] == "cancelled"
        assert after["progress"]["ok"] >= final["progress"]["ok"] >= 4
        assert after["progress"]["ok"] + after["progress"]["failed"] <= downloaded
        # Finished images keep their outputs.
        output = next(url for p in after["products"] for url in p["output_urls"] if url)
        assert client.get(output).status_code == 200

        again = client.post(f"{system.ingest_url}/requests/{request_id}/cancel")
        assert again.status_code == 409 and "cancelled" in again.json()["detail"]
        retry = client.post(f"{system.ingest_url}/requests/{request_id}/retry")
        assert retry.status_code == 409

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "request.cancelled" not in _types(hooks):
            time.sleep(0.1)
        assert "request.cancelled" in _types(hooks)


def _types(hooks: list[dict[str, Any]]) -> list[str]:
    return [hook["type"] for hook in hooks]


@pytest.mark.timeout(300)
def test_retry_runs_only_the_failed_images_again(settings: Settings) -> None:
    with (
        remote_host() as host,
        loopback_server() as server,
        running_system(settings, IMGPIPE_DOWNLOAD_ATTEMPTS="1") as system,
        httpx.Client(timeout=30) as client,
    ):
        hooks = webhooks(server)
        healthy = [host.add(f"/ok/{i}.jpg", jpeg_bytes(200, 150, seed=i)) for i in range(5)]
        # Their host is down for the first run (one attempt each), back for the retry.
        down = [
            host.add(f"/down/{i}.jpg", jpeg_bytes(200, 150, seed=50 + i), Status(503))
            for i in range(3)
        ]
        request_id = upload(
            client, system, catalogue(healthy + down), webhook_url=server.url("/hooks")
        )
        status_url = f"{system.status_url}/status/{request_id}"
        first = wait_for(client, status_url, lambda body: body["status"] in FINAL)
        assert first["status"] == "completed"
        assert first["progress"] == {"total": 8, "ok": 5, "failed": 3}

        answer = client.post(f"{system.ingest_url}/requests/{request_id}/retry")
        assert answer.status_code == 202, answer.text
        assert answer.json()["round"] == 1
        # A second click while it runs is refused rather than doubled.
        assert client.post(f"{system.ingest_url}/requests/{request_id}/retry").status_code == 409

        final = wait_for(
            client,
            status_url,
            lambda body: body["status"] in FINAL and body["progress"]["failed"] == 0,
        )
        assert final["status"] == "completed"
        assert final["progress"] == {"total": 8, "ok": 8, "failed": 0}
        for url in healthy:  # the images that worked were not downloaded again
            assert len(host.requests_for(url.removeprefix(host.base_url))) == 1
        for url in down:
            assert [s.status for s in host.requests_for(url.removeprefix(host.base_url))] == [
                503,
                200,
            ]
        outputs = [url for product in final["products"] for url in product["output_urls"]]
        assert all(outputs)
        rows = list(csv.reader(io.StringIO(client.get(f"{status_url}/output.csv").text)))
        assert all(cell for row in rows[1:] for cell in row[3].split(","))
        for url in outputs:
            assert client.get(url).status_code == 200

        # Nothing failed any more: nothing to retry.
        assert client.post(f"{system.ingest_url}/requests/{request_id}/retry").status_code == 409
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _types(hooks).count("request.completed") < 2:
            time.sleep(0.1)
        assert _types(hooks).count("request.completed") == 2
        assert _types(hooks).count("request.processing") == 2


@pytest.mark.timeout(300)
def test_a_deleted_request_is_gone_from_every_service(settings: Settings) -> None:
    with (
        remote_host() as host,
        running_system(settings) as system,
        httpx.Client(timeout=30) as client,
    ):
        urls = [host.add(f"/img/{i}.jpg", jpeg_bytes(200, 150, seed=i)) for i in range(6)]
        urls.append(host.url("/missing.jpg"))
        request_id = upload(client, system, catalogue(urls))
        status_url = f"{system.status_url}/status/{request_id}"
        final = wait_for(client, status_url, lambda body: body["status"] in FINAL)
        outputs = [url for product in final["products"] for url in product["output_urls"] if url]
        assert len(outputs) == 6 and all(client.get(u).status_code == 200 for u in outputs)
        media = settings.media_dir / "objects"  # shared outputs; no other request uses them
        assert len(list(media.iterdir())) == 6
        assert documents_mentioning(settings, request_id)  # the check below can fail

        answer = client.delete(f"{system.ingest_url}/requests/{request_id}")
        assert answer.status_code == 202, answer.text

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and client.get(status_url).status_code != 404:
            time.sleep(0.1)
        assert client.get(status_url).status_code == 404
        assert client.get(f"{status_url}/output.csv").status_code == 404
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(media.iterdir()):
            time.sleep(0.1)
        assert list(media.iterdir()) == []
        assert all(client.get(u).status_code == 404 for u in outputs)
        left = _without_tombstones(documents_mentioning(settings, request_id))
        assert left == {}, left
        assert client.delete(f"{system.ingest_url}/requests/{request_id}").status_code == 404


def _without_tombstones(found: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict]]:
    """A deleted request's bare tombstone (its id and when) keeps late work of it from
    running; it holds nothing of the request."""
    kept = {
        name: [doc for doc in docs if set(doc) - {"_id", "deleted", "deleted_at"}]
        for name, docs in found.items()
    }
    return {name: docs for name, docs in kept.items() if docs}


@pytest.mark.timeout(300)
def test_retention_deletes_finished_requests_older_than_the_setting(settings: Settings) -> None:
    with (
        remote_host() as host,
        running_system(
            settings, IMGPIPE_RETENTION_DAYS=str(3 / 86400), IMGPIPE_RETENTION_INTERVAL="0.5"
        ) as system,
        httpx.Client(timeout=30) as client,
    ):
        urls = [host.add(f"/img/{i}.jpg", jpeg_bytes(120, 90, seed=i)) for i in range(3)]
        request_id = upload(client, system, catalogue(urls))
        status_url = f"{system.status_url}/status/{request_id}"
        wait_for(client, status_url, lambda body: body["status"] in FINAL)
        finished = time.monotonic()
        deadline = finished + 60
        while time.monotonic() < deadline and client.get(status_url).status_code != 404:
            time.sleep(0.2)
        assert client.get(status_url).status_code == 404
        assert time.monotonic() - finished >= 2  # kept for about the 3 s it was told to
        # The processor deletes the files in its own time, after status forgot the request.
        objects = settings.media_dir / "objects"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and list(objects.iterdir()):
            time.sleep(0.2)
        assert list(objects.iterdir()) == []
