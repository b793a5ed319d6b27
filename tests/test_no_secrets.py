"""No secret leaves the system through its logs or its metrics.

`imgpipe up` runs every service as a real process, with JSON logs and a distinctive value
for every secret it is given: API keys, the webhook signing key, Cloudinary's API secret
(against a loopback Cloudinary), the broker's credentials and the database's. One real
request (a webhook to a loopback receiver, an image that fails) goes through; then every
service's /metrics, the launcher's console and every log file are read, and none may hold
a secret. The logs must hold the request's id, so a run that logged nothing cannot pass.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
from pymongo import MongoClient
from pymongo.errors import PyMongoError
from standardwebhooks.webhooks import Webhook

from imgpipe.contracts.settings import Settings
from tests.support.fake_cloudinary import fake_cloudinary
from tests.support.http_server import LoopbackServer, Recorded, Response, loopback_server
from tests.support.images import jpeg_bytes
from tests.support.up import start_up

API_KEYS = ["imgpipe-key-Zq7XvT0pRk2Wd", "imgpipe-key-second-Mw4Ly9Ha"]
WEBHOOK_KEY = b"no-secrets-webhook-key-9f3KqL2x"
WEBHOOK_SECRET = "whsec_" + base64.b64encode(WEBHOOK_KEY).decode()
CLOUDINARY_SECRET = "cld-secret-Vt8Qw3Hn5JkPe"
MONGO_USER = "imgpipe-" + uuid.uuid4().hex[:8]
MONGO_PASSWORD = "mongo-pw-Rf6Tz1LxUc9"
SERVICES = ("ingest", "processor", "status", "notifier")
FINAL = ("completed", "error")


def with_credentials(url: str, user: str, password: str) -> str:
    parts = urlsplit(url)
    netloc = f"{user}:{password}@{parts.hostname}:{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


@contextmanager
def database_user(mongo_url: str) -> Iterator[str | None]:
    """MONGODB_URL with a user and password the server knows (SecantusDB and MongoDB both
    take createUser and SCRAM); None when this server will not create one (a MongoDB with
    access control, given by MONGODB_URL): the database's password is then not checked."""
    admin = MongoClient(mongo_url, serverSelectionTimeoutMS=10_000)
    try:
        try:
            admin.admin.command("createUser", MONGO_USER, pwd=MONGO_PASSWORD, roles=["root"])
        except PyMongoError:
            yield None
            return
        url = with_credentials(mongo_url, MONGO_USER, MONGO_PASSWORD)
        with MongoClient(url, serverSelectionTimeoutMS=10_000) as check:
            check.admin.command("ping")  # the credentials work
        try:
            yield url
        finally:
            with suppress(PyMongoError):
                admin.admin.command("dropUser", MONGO_USER)
    finally:
        admin.close()


def catalogue(server: LoopbackServer) -> tuple[str, int]:
    """Two products: two JPEGs, and one image the host answers 404 for."""
    ok = [server.add(f"/img/{i}.jpg", Response(jpeg_bytes(seed=i))) for i in range(2)]
    missing = server.url("/img/missing.jpg")
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\r\n")
    writer.writerow(["S. No.", "Product Name", "Input Image Urls"])
    writer.writerow(["1", "Shirt", ",".join(ok)])
    writer.writerow(["2", "Gone", missing])
    return text.getvalue(), 3


def webhook_receiver(server: LoopbackServer) -> list[bytes]:
    bodies: list[bytes] = []

    def receive(request: Recorded) -> Response:
        headers = {k.lower(): v for k, v in request.headers.items()}
        Webhook(WEBHOOK_SECRET).verify(request.body, headers)  # signed with our secret
        bodies.append(request.body)
        return Response(b"ok", 200)

    server.add("/hooks", receive)
    return bodies


def wait_until(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.mark.timeout(600)
def test_no_secret_in_logs_or_metrics(settings: Settings) -> None:
    settings = settings.model_copy(update={"api_keys": API_KEYS, "webhook_secret": WEBHOOK_SECRET})
    auth = {"Authorization": f"Bearer {API_KEYS[1]}"}
    assert settings.mongodb_url
    with (
        fake_cloudinary(api_secret=CLOUDINARY_SECRET) as cloud,
        database_user(settings.mongodb_url) as mongo_url,
        loopback_server() as server,
    ):
        environment = {
            "IMGPIPE_LOG_FORMAT": "json",
            "CLOUDINARY_URL": cloud.cloudinary_url(),
            "IMGPIPE_WORKERS": "1",
        }
        if mongo_url:
            environment["MONGODB_URL"] = mongo_url
        # A long readiness wait: a loaded 2-core CI machine can take over a minute.
        up = start_up(settings, "--ready-timeout", "240", embedded=False, **environment)
        secrets = {
            "an API key": API_KEYS[0],
            "the other API key": API_KEYS[1],
            "WEBHOOK_SECRET": WEBHOOK_SECRET,
            "the webhook key (base64)": WEBHOOK_SECRET.removeprefix("whsec_"),
            "the webhook key": WEBHOOK_KEY.decode(),
            "CLOUDINARY_URL": environment["CLOUDINARY_URL"],
            "Cloudinary's API secret": CLOUDINARY_SECRET,
            "AMQP_URL": up.env["AMQP_URL"],
            "the broker's default credentials": "guest:guest@",
        }
        amqp = urlsplit(up.env["AMQP_URL"])
        assert amqp.password, "the broker's URL carries a password to look for"
        secrets["AMQP_URL's credentials"] = f"{amqp.username}:{amqp.password}@"
        if mongo_url:
            secrets |= {"MONGODB_URL": mongo_url, "the database password": MONGO_PASSWORD}
        try:
            up.wait_until_up(300)
            csv_text, images = catalogue(server)
            hooks = webhook_receiver(server)
            with httpx.Client(timeout=30, headers=auth) as client:
                # The keys are in force: without one the API refuses.
                refused = httpx.post(f"http://127.0.0.1:{up.settings.ingest_port}/upload")
                assert refused.status_code == 401, refused.text
                upload = client.post(
                    f"http://127.0.0.1:{up.settings.ingest_port}/upload",
                    files={"file": ("products.csv", csv_text.encode(), "text/csv")},
                    data={"webhook_url": server.url("/hooks")},
                )
                assert upload.status_code == 202, upload.text
                request_id = upload.json()["request_id"]
                status_url = f"http://127.0.0.1:{up.settings.status_port}/status/{request_id}"

                def finished() -> bool:
                    answer = client.get(status_url)
                    return answer.status_code == 200 and answer.json()["status"] in FINAL

                wait_until(finished, 180, "the request to finish")
                status = client.get(status_url)
                assert status.json()["progress"] == {"total": images, "ok": 2, "failed": 1}
                wait_until(
                    lambda: any(json.loads(b)["status"] in FINAL for b in hooks), 60, "webhooks"
                )
                # The images went to the loopback Cloudinary, signed with its secret.
                assert len(cloud.assets) == 2
                deliveries = client.get(
                    f"http://127.0.0.1:{up.settings.notifier_port}/deliveries",
                    params={"request_id": request_id},
                )
                assert deliveries.status_code == 200, deliveries.text

                expositions = {}
                for name in SERVICES:
                    port = getattr(up.settings, f"{name}_port")
                    scraped = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
                    assert scraped.status_code == 200, (name, scraped.text)
                    expositions[name] = scraped.text
                answers = {
                    "the status answer": status.text,
                    "the delivery log": deliveries.text,
                    "the output CSV": client.get(f"{status_url}/output.csv").text,
                }
        finally:
            code = up.stop()
        assert code == 0, up.output

    logs = {
        path.name: path.read_text(errors="replace")
        for path in sorted((up.settings.data_dir / "logs").glob("*"))
    }
    # What is checked is really there: every service logged, in JSON, about the request.
    assert set(logs) >= {f"{name}.log" for name in SERVICES}, sorted(logs)
    for name in SERVICES:
        records = [json.loads(line) for line in logs[f"{name}.log"].splitlines() if line[:1] == "{"]
        assert records, f"{name} logged no JSON line"
        assert all(record["service"] == name for record in records)
    # The processor logs the request's work with its id, the notifier each delivery; the
    # status service's access log has it in the path; ingest logs no line of its own per
    # upload.
    for name in ("processor", "notifier"):
        records = [json.loads(line) for line in logs[f"{name}.log"].splitlines() if line[:1] == "{"]
        assert any(record.get("request_id") == request_id for record in records), name
    assert f"/status/{request_id}" in logs["status.log"]
    assert "webhook request.completed to http://127.0.0.1 " in logs["notifier.log"]
    assert '"storage: Cloudinary cloud ' in logs["processor.log"]
    assert "imgpipe: started processor" in up.output
    for name, text in expositions.items():
        assert "imgpipe_process_cpu_seconds_total " in text, name
    assert "imgpipe_requests_received_total 1.0" in expositions["ingest"]
    assert 'imgpipe_images_processed_total{error_code="' in expositions["processor"]
    assert "imgpipe_events_consumed_total{" in expositions["status"]
    assert 'imgpipe_webhook_attempts_total{outcome="delivered"}' in expositions["notifier"]

    places = {
        "the launcher's console": up.output,
        **{f"log {name}": text for name, text in logs.items()},
        **{f"/metrics of {name}": text for name, text in expositions.items()},
        **{f"webhook {n}": body.decode() for n, body in enumerate(hooks)},
        **answers,
    }
    leaks = [
        f"{what} in {where}"
        for where, text in places.items()
        for what, secret in secrets.items()
        if secret in text
    ]
    assert not leaks, leaks
