"""A webhook retry that is pending when the notifier is SIGKILLed still happens."""

from __future__ import annotations

import threading

import httpx
import pytest
from standardwebhooks.webhooks import Webhook

from imgpipe.contracts.settings import Settings
from tests.support.faults import csv_upload, wait_finished, wait_until
from tests.support.http_server import Recorded, Response, loopback_server
from tests.support.images import jpeg_bytes
from tests.support.system import running_system

pytestmark = pytest.mark.timeout(240)


def test_retry_pending_when_notifier_is_killed_still_happens(settings: Settings) -> None:
    secret = settings.resolved_webhook_secret
    answers: list[int] = []
    delivered: list[dict] = []
    lock = threading.Lock()

    def receiver(request: Recorded) -> Response:
        headers = {name.lower(): value for name, value in request.headers.items()}
        payload = Webhook(secret).verify(request.body, headers)
        with lock:
            status = 500 if not answers else 200  # the first attempt fails
            answers.append(status)
            if status == 200:
                delivered.append(payload)
        return Response(b"", status)

    # The first retry is due long after the kill, so only the restarted notifier can send it.
    env = {"WEBHOOK_RETRY_SCHEDULE": "8s,8s,8s", "WEBHOOK_POLL_INTERVAL": "0.2"}
    with loopback_server() as server, running_system(settings, **env) as system:
        server.add("/hook", receiver)
        image = server.add("/a.jpg", Response(jpeg_bytes(seed=1), content_type="image/jpeg"))
        with httpx.Client(timeout=30) as client:
            upload = client.post(
                f"{system.ingest_url}/upload",
                files={"file": ("p.csv", csv_upload([image]), "text/csv")},
                data={"webhook_url": server.url("/hook")},
            )
            assert upload.status_code == 202, upload.text
            request_id = upload.json()["request_id"]

            wait_until(lambda: answers == [500], timeout=60, what="first attempt answered 500")
            # Killed once the retry is pending: the failed attempt recorded, its retry due.
            wait_until(
                lambda: _attempts(client, system.notifier_url, request_id) == [500],
                timeout=30,
                what="the failed attempt recorded",
            )
            notifier = system.services["notifier"]
            notifier.kill()
            notifier.restart()

            wait_finished(client, f"{system.status_url}/status/{request_id}")
            wait_until(lambda: len(delivered) >= 3, timeout=90, what="every webhook delivered")
            assert [hook["status"] for hook in delivered] == ["received", "processing", "completed"]

            log = client.get(f"{system.notifier_url}/deliveries", params={"request_id": request_id})
            (received,) = [d for d in log.json() if d["event_type"] == "request.received"]
            assert [attempt["status_code"] for attempt in received["attempts"]] == [500, 200]
            assert received["status"] == "delivered"


def _attempts(client: httpx.Client, notifier_url: str, request_id: str) -> list[int | None]:
    """The status codes of the recorded attempts of the request.received webhook."""
    log = client.get(f"{notifier_url}/deliveries", params={"request_id": request_id}).json()
    received = [d for d in log if d["event_type"] == "request.received"]
    return [attempt["status_code"] for attempt in received[0]["attempts"]] if received else []
