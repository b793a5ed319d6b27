"""Webhooks end to end: real broker, real database, a real HTTP receiver that verifies
every Standard Webhooks signature."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from imgpipe.contracts import mongo
from imgpipe.contracts.bus import Bus
from imgpipe.contracts.events import CloudEvent, Row
from imgpipe.contracts.products import byte_totals
from imgpipe.contracts.settings import Settings
from imgpipe.contracts.topology import Topology
from imgpipe.notifier.app import create_app
from imgpipe.notifier.config import NotifierConfig
from imgpipe.notifier.subscriptions import normalise_url
from tests.support import events
from tests.support.apps import serving
from tests.support.http_server import LoopbackServer, Recorded, Response
from tests.support.metrics import Samples, moved, promtool_check, scrape

WAIT = 60.0  # generous ceiling for anything that happens in the background
# A brisk dispatcher so tests finish quickly; they never assert on durations.
FAST = NotifierConfig(poll_interval=0.1, timeout=5.0, lease_margin=5.0, completion_grace=30.0)

T0 = events.T0
ROWS = [
    Row(serial_number="1", product_name="Shoe", input_urls=["http://in/a.jpg", "http://in/b.jpg"]),
    Row(serial_number="2", product_name="Hat", input_urls=["http://in/c.jpg"]),
]


# Event builders --------------------------------------------------------------------


def received(request_id: str, webhook_url: str | None = None) -> CloudEvent:
    return events.received(request_id, ROWS, webhook_url=webhook_url)


def processed(request_id: str, row: int, position: int, *, ok: bool = True) -> CloudEvent:
    url = ROWS[row].input_urls[position]
    return events.processed(request_id, row, position, input_url=url, ok=ok)


def completed(request_id: str, ok: int = 3, failed: int = 0) -> CloudEvent:
    return events.completed(request_id, ok, failed)


def lifecycle(request_id: str, webhook_url: str | None = None) -> list[CloudEvent]:
    """A whole request in order: one image fails, so counts are 2 ok and 1 failed."""
    return [
        received(request_id, webhook_url),
        processed(request_id, 0, 0),
        processed(request_id, 0, 1, ok=False),
        processed(request_id, 1, 0),
        completed(request_id, ok=2, failed=1),
    ]


# The webhook receiver --------------------------------------------------------------


@dataclass
class Delivered:
    path: str
    headers: dict[str, str]
    payload: dict[str, Any]
    status: int  # what the receiver answered


@dataclass
class Receiver:
    """Answers each path from a script (then a default), after verifying the signature."""

    server: LoopbackServer
    secret: str
    received: list[Delivered] = field(default_factory=list)
    bad_signatures: list[str] = field(default_factory=list)
    _scripts: dict[str, list[Response]] = field(default_factory=dict)
    _defaults: dict[str, Response] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def endpoint(self, path: str, *script: Response, default: Response | None = None) -> str:
        self._scripts[path] = list(script)
        self._defaults[path] = default or Response(b"ok", 200, "text/plain")
        return self.server.add(path, self._answer)

    def set_default(self, path: str, response: Response) -> None:
        self._defaults[path] = response

    def _answer(self, request: Recorded) -> Response:
        path = request.path.split("?")[0]
        try:
            payload = Webhook(self.secret).verify(request.body, request.headers)
        except WebhookVerificationError as exc:
            with self._lock:
                self.bad_signatures.append(f"{path}: {exc}")
            return Response(b"bad signature", 400, "text/plain")
        with self._lock:
            script = self._scripts[path]
            response = script.pop(0) if script else self._defaults[path]
            headers = {k.lower(): v for k, v in request.headers.items()}
            self.received.append(Delivered(path, headers, payload, response.status))
        return response

    def to(self, path: str) -> list[Delivered]:
        with self._lock:
            return [d for d in self.received if d.path == path]

    def types(self, path: str) -> list[str]:
        return [d.payload["type"] for d in self.to(path) if 200 <= d.status < 300]


@pytest.fixture
def receiver(settings: Settings) -> Iterator[Receiver]:
    server = LoopbackServer().start()
    try:
        yield Receiver(server, settings.resolved_webhook_secret)
    finally:
        server.stop()


# The app, a publisher, waiting -----------------------------------------------------


@asynccontextmanager
async def _running(
    settings: Settings, config: NotifierConfig = FAST
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    app = create_app(settings, config)
    async with serving(app, "http://notifier") as client:
        yield app, client


@pytest.fixture
def run_notifier() -> Callable[..., Any]:
    """`async with run_notifier(settings[, config]) as (app, client): ...`"""
    return _running


@pytest.fixture
async def bus(settings: Settings) -> AsyncIterator[Bus]:
    bus = await Bus.connect(settings.amqp_url, Topology(settings.namespace))
    try:
        yield bus
    finally:
        await bus.close()


async def publish(bus: Bus, *events: CloudEvent) -> None:
    """One at a time, so the broker keeps this order in the queue."""
    for event in events:
        await bus.publish(event)


async def wait_until(check: Callable[[], Awaitable[Any]] | Callable[[], Any], what: str) -> Any:
    """Poll `check` until it returns something truthy; fail with `what` after WAIT."""
    deadline = time.monotonic() + WAIT
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def deliveries(client: httpx.AsyncClient, request_id: str) -> list[dict[str, Any]]:
    """A request's deliveries oldest first, so in lifecycle order: the API lists newest
    first (see test_deliveries_are_listed_newest_first_and_paged_back_with_before)."""
    response = await client.get("/deliveries", params={"request_id": request_id})
    assert response.status_code == 200, response.text
    return response.json()[::-1]


# Tests ---------------------------------------------------------------------------

LIFECYCLE = ["request.received", "request.processing", "request.completed"]


def new_id() -> str:
    return uuid.uuid4().hex


def quick_retries(settings: Settings, *delays: float) -> Settings:
    return settings.model_copy(update={"webhook_retry_schedule": list(delays)})


async def test_each_status_change_arrives_once_in_order_signed(
    settings, receiver, bus, run_notifier
) -> None:
    settings = settings.model_copy(update={"prefetch": 1})  # events handled in queue order
    hook = receiver.endpoint("/hook")
    sentinel = receiver.endpoint("/sentinel")
    request_id = new_id()
    r, p1, p2, p3, c = lifecycle(request_id, hook)
    async with run_notifier(settings) as (_, client):
        # Every event at least twice, duplicates interleaved as redeliveries would be.
        await publish(bus, r, r, p1, p1, r, p2, p3, c, p2, c, r, p1, c)
        await publish(bus, received(new_id(), sentinel))  # handled after all of the above
        await wait_until(lambda: receiver.types("/hook") == LIFECYCLE, "three webhooks")
        await wait_until(lambda: receiver.types("/sentinel"), "the sentinel webhook")
        log = await deliveries(client, request_id)

    assert receiver.bad_signatures == []
    assert receiver.types("/hook") == LIFECYCLE  # nothing more came
    assert [d["event_type"] for d in log] == LIFECYCLE
    assert all(d["status"] == "delivered" and len(d["attempts"]) == 1 for d in log)

    first, second, final = (d.payload for d in receiver.to("/hook"))
    assert first["status"] == "received"
    assert first["request_id"] == request_id
    assert first["counts"] == {"total": 3, "ok": 0, "failed": 0}
    assert second["status"] == "processing"
    assert final["type"] == "request.completed"
    assert final["counts"] == {"total": 3, "ok": 2, "failed": 1}
    assert final["output_csv_url"] == f"http://127.0.0.1:8002/status/{request_id}/output.csv"
    assert final["products"] == [
        {
            "serial_number": "1",
            "product_name": "Shoe",
            "input_urls": ["http://in/a.jpg", "http://in/b.jpg"],
            "output_urls": [f"http://media/{request_id}/0-0.jpg", None],
            "errors": [None, {"code": "download_failed", "message": "HTTP 404"}],
            "attempts": [1, 3],
        },
        {
            "serial_number": "2",
            "product_name": "Hat",
            "input_urls": ["http://in/c.jpg"],
            "output_urls": [f"http://media/{request_id}/1-0.jpg"],
            "errors": [None],
            "attempts": [1],
        },
    ]
    # Two ok images of 1000 bytes in and 300 out each (tests.support.events.processed),
    # in the shape of GET /status/{id}'s `bytes`.
    assert final["bytes"] == {"images": 2, "input": 2000, "output": 600, "ratio": 0.3}
    # The webhook-id names the message: different per status change.
    ids = {d.headers["webhook-id"] for d in receiver.to("/hook")}
    assert len(ids) == 3


def test_byte_totals_count_an_image_stored_once_once() -> None:
    """A URL in several cells is one stored image (one output URL): counted once, as the
    status answer counts it; images stored before sizes were kept count as 0 bytes."""
    images = [
        {"output_url": "http://media/r/0-0.jpg", "bytes_in": 1000, "bytes_out": 300},
        {"output_url": "http://media/r/0-0.jpg", "bytes_in": 1000, "bytes_out": 300},
        {"output_url": "http://media/r/1-0.jpg", "bytes_in": 3000, "bytes_out": 500},
        {"output_url": "http://media/r/2-0.jpg"},
    ]
    assert byte_totals(images) == {"images": 3, "input": 4000, "output": 800, "ratio": 0.2}
    assert byte_totals([]) == {"images": 0, "input": 0, "output": 0, "ratio": None}


async def test_events_before_request_received_wait_for_it(
    settings, receiver, bus, run_notifier
) -> None:
    settings = settings.model_copy(update={"prefetch": 1})  # events handled in queue order
    hook = receiver.endpoint("/hook")
    sentinel = receiver.endpoint("/sentinel")
    request_id = new_id()
    r, p1, p2, p3, c = lifecycle(request_id, hook)
    async with run_notifier(settings) as (_, client):
        await publish(bus, p3, c, p1, p2, received(new_id(), sentinel))
        await wait_until(lambda: receiver.types("/sentinel"), "the events before it handled")
        # Held: the webhook URL only comes with RequestReceived.
        assert receiver.to("/hook") == []
        assert await deliveries(client, request_id) == []
        await publish(bus, r)
        await wait_until(lambda: receiver.types("/hook") == LIFECYCLE, "three webhooks")
    assert receiver.bad_signatures == []
    final = receiver.to("/hook")[-1].payload
    assert final["counts"] == {"total": 3, "ok": 2, "failed": 1}
    assert final["products"][0]["output_urls"] == [f"http://media/{request_id}/0-0.jpg", None]


async def test_final_webhook_waits_a_grace_time_for_missing_image_outcomes(
    settings, receiver, bus, run_notifier
) -> None:
    config = FAST.model_copy(update={"completion_grace": 0.5})
    hook = receiver.endpoint("/hook")
    request_id = new_id()
    r, p1, p2, p3, c = lifecycle(request_id, hook)
    async with run_notifier(settings, config) as (_, client):
        # One outcome never arrives (say it was dead-lettered): the final webhook still goes.
        await publish(bus, r, p1, c)
        await wait_until(lambda: receiver.types("/hook") == LIFECYCLE, "three webhooks")
        await publish(bus, p2, p3, c)  # late arrivals change nothing already sent
        log = await deliveries(client, request_id)
    assert len(log) == 3
    final = receiver.to("/hook")[-1].payload
    assert final["counts"] == {"total": 3, "ok": 2, "failed": 1}  # from RequestCompleted
    assert final["products"][0]["output_urls"] == [f"http://media/{request_id}/0-0.jpg", None]
    assert final["products"][1]["output_urls"] == [None]  # its outcome was never seen


async def test_retries_after_500_until_delivered(settings, receiver, bus, run_notifier) -> None:
    settings = quick_retries(settings, 0.05, 0.05, 0.05)
    hook = receiver.endpoint("/flaky", Response(status=500), Response(status=503))
    request_id = new_id()
    async with run_notifier(settings) as (_, client):
        await publish(bus, received(request_id, hook))
        log = await wait_until(
            lambda: _delivered(client, request_id), "the retried delivery to succeed"
        )
    [delivery] = log
    attempts = delivery["attempts"]
    assert [a["status_code"] for a in attempts] == [500, 503, 200]
    assert [a["outcome"] for a in attempts] == ["retry", "retry", "delivered"]
    assert all(a["next_retry_at"] for a in attempts[:2]) and attempts[2]["next_retry_at"] is None
    assert all(a["latency_ms"] >= 0 and a["endpoint"] == hook for a in attempts)
    assert attempts[0]["error"] == "HTTP 500"
    # Three signed requests for the same message: one webhook-id throughout.
    assert len({d.headers["webhook-id"] for d in receiver.to("/flaky")}) == 1
    assert len(receiver.to("/flaky")) == 3
    assert receiver.bad_signatures == []


async def _delivered(client, request_id: str) -> list | None:
    log = await deliveries(client, request_id)
    return log if log and all(d["status"] == "delivered" for d in log) else None


async def test_retries_end_when_the_schedule_is_used_up(
    settings, receiver, bus, run_notifier
) -> None:
    settings = quick_retries(settings, 0.05)
    hook = receiver.endpoint("/down", default=Response(status=502))
    request_id = new_id()
    async with run_notifier(settings) as (_, client):
        await publish(bus, received(request_id, hook))
        [delivery] = await wait_until(lambda: _finished(client, request_id), "the delivery to fail")
    assert delivery["status"] == "failed"
    assert [a["status_code"] for a in delivery["attempts"]] == [502, 502]
    assert delivery["next_attempt_at"] is None


async def _finished(client, request_id: str) -> list | None:
    log = await deliveries(client, request_id)
    return log if log and all(d["status"] != "pending" for d in log) else None


async def test_410_is_final_and_can_be_replayed(settings, receiver, bus, run_notifier) -> None:
    settings = quick_retries(settings, 0.05, 0.05)
    hook = receiver.endpoint("/gone", default=Response(status=410))
    request_id = new_id()
    async with run_notifier(settings) as (_, client):
        await publish(bus, received(request_id, hook), processed(request_id, 0, 0))
        log = await wait_until(
            lambda: _finished_count(client, request_id, 2), "both deliveries to fail"
        )
        # A final failure does not hold back the next webhook to that endpoint.
        assert [d["event_type"] for d in log] == LIFECYCLE[:2]
        for delivery in log:
            assert delivery["status"] == "failed"
            [attempt] = delivery["attempts"]
            assert attempt["status_code"] == 410
            assert attempt["outcome"] == "failed"
            assert attempt["next_retry_at"] is None

        # The receiver is fixed; replay the first one by hand.
        receiver.set_default("/gone", Response(status=204))
        response = await client.post(f"/deliveries/{log[0]['id']}/retry")
        assert response.status_code == 202
        assert response.json()["status"] == "pending"
        replayed = await wait_until(
            lambda: _status_of(client, log[0]["id"], "delivered"), "the replay"
        )
        assert [a["status_code"] for a in replayed["attempts"]] == [410, 204]
        assert (await client.post("/deliveries/dlv_nope/retry")).status_code == 404
    assert receiver.types("/gone") == ["request.received"]


async def _finished_count(client, request_id: str, count: int) -> list | None:
    log = await deliveries(client, request_id)
    done = [d for d in log if d["status"] != "pending"]
    return log if len(done) == count else None


async def _status_of(client, delivery_id: str, status: str) -> dict | None:
    response = await client.get(f"/deliveries/{delivery_id}")
    body = response.json()
    return body if body["status"] == status else None


async def test_a_dead_endpoint_does_not_delay_another(
    settings, receiver, bus, run_notifier
) -> None:
    # The stuck endpoint answers long after the attempt timeout; if deliveries shared a
    # line, the healthy one would wait for that timeout. It gets everything while the
    # stuck attempt has not even ended (no attempt logged yet).
    config = FAST.model_copy(update={"timeout": 30.0})
    stuck = receiver.endpoint("/stuck", default=Response(status=200, delay=45))
    healthy = receiver.endpoint("/healthy")
    request_id = new_id()
    async with run_notifier(settings, config) as (_, client):
        created = await client.post("/subscriptions", json={"url": healthy})
        assert created.status_code == 201
        await publish(bus, *lifecycle(request_id, stuck))
        await wait_until(lambda: receiver.types("/healthy") == LIFECYCLE, "healthy deliveries")
        log = await deliveries(client, request_id)
    to_stuck = [d for d in log if d["endpoint"] == stuck]
    assert [d["event_type"] for d in to_stuck] == LIFECYCLE
    assert all(d["status"] == "pending" and d["attempts"] == [] for d in to_stuck)
    # Only the first webhook went out to the stuck endpoint: the rest wait their turn.
    assert [d.payload["type"] for d in receiver.to("/stuck")] in ([], ["request.received"])


async def test_a_pending_retry_is_sent_by_a_new_instance(
    settings, receiver, bus, run_notifier
) -> None:
    settings = quick_retries(settings, 0.5, 0.5, 0.5, 0.5)
    hook = receiver.endpoint("/later", default=Response(status=503))
    request_id = new_id()
    async with run_notifier(settings) as (_, client):
        await publish(bus, received(request_id, hook))
        await wait_until(lambda: _attempted(client, request_id), "a first failed attempt")
    # The first instance is gone with the retry still pending in MongoDB.
    receiver.set_default("/later", Response(status=200))
    async with run_notifier(settings) as (_, client):
        [delivery] = await wait_until(lambda: _delivered(client, request_id), "the retry")
    codes = [a["status_code"] for a in delivery["attempts"]]
    assert codes[0] == 503 and codes[-1] == 200
    assert receiver.types("/later") == ["request.received"]


async def _attempted(client, request_id: str) -> bool:
    log = await deliveries(client, request_id)
    return bool(log and log[0]["attempts"])


async def test_subscriptions_crud_and_event_type_filter(
    settings, receiver, bus, run_notifier
) -> None:
    every = receiver.endpoint("/every")
    finals = receiver.endpoint("/finals")
    removed = receiver.endpoint("/removed")
    request_id = new_id()
    async with run_notifier(settings) as (_, client):
        created = await client.post("/subscriptions", json={"url": every})
        assert created.status_code == 201
        sub = created.json()
        assert sub["id"] and sub["url"] == every
        assert sub["event_types"] == [*LIFECYCLE, "request.error", "request.cancelled"]
        only_final = await client.post(
            "/subscriptions",
            json={"url": finals, "event_types": ["request.completed", "request.error"]},
        )
        assert only_final.status_code == 201
        gone = (await client.post("/subscriptions", json={"url": removed})).json()

        assert (await client.get(f"/subscriptions/{sub['id']}")).json() == sub
        listed = (await client.get("/subscriptions")).json()
        assert [s["url"] for s in listed] == [every, finals, removed]
        assert (await client.delete(f"/subscriptions/{gone['id']}")).status_code == 204
        assert (await client.get(f"/subscriptions/{gone['id']}")).status_code == 404
        assert (await client.delete(f"/subscriptions/{gone['id']}")).status_code == 404
        assert len((await client.get("/subscriptions")).json()) == 2

        for bad in (
            {"url": "ftp://example.com/x"},
            {"url": "not a url"},
            {"url": every, "event_types": ["request.exploded"]},
            {"url": every, "event_types": []},
        ):
            assert (await client.post("/subscriptions", json=bad)).status_code == 422, bad

        await publish(bus, *lifecycle(request_id))  # no webhook_url: subscriptions only
        await wait_until(lambda: receiver.types("/every") == LIFECYCLE, "all three")
        await wait_until(lambda: receiver.types("/finals"), "the final webhook")
        log = await deliveries(client, request_id)
    assert receiver.types("/finals") == ["request.completed"]
    assert receiver.to("/removed") == []
    assert {d["endpoint"] for d in log} == {every, finals}
    assert receiver.bad_signatures == []


async def test_error_status_goes_to_error_subscribers(
    settings, receiver, bus, run_notifier
) -> None:
    errors = receiver.endpoint("/errors")
    request_id = new_id()
    async with run_notifier(settings) as (_, client):
        created = await client.post(
            "/subscriptions", json={"url": errors, "event_types": ["request.error"]}
        )
        assert created.status_code == 201
        await publish(
            bus,
            received(request_id),
            processed(request_id, 0, 0, ok=False),
            processed(request_id, 0, 1, ok=False),
            processed(request_id, 1, 0, ok=False),
            completed(request_id, ok=0, failed=3),
        )
        await wait_until(lambda: receiver.types("/errors"), "the error webhook")
    [delivered] = receiver.to("/errors")
    assert delivered.payload["type"] == "request.error"
    assert delivered.payload["status"] == "error"
    assert delivered.payload["counts"] == {"total": 3, "ok": 0, "failed": 3}
    assert delivered.payload["bytes"] == {"images": 0, "input": 0, "output": 0, "ratio": None}
    products = delivered.payload["products"]
    assert all(p["output_urls"] == [None] * len(p["input_urls"]) for p in products)


async def test_health_is_open_and_the_api_wants_a_key(settings, run_notifier) -> None:
    settings = settings.model_copy(update={"api_keys": ["k1"]})
    async with run_notifier(settings) as (_, client):
        assert (await client.get("/healthz")).status_code == 200
        ready = await client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["checks"] == {"broker": True, "database": True}
        assert (await client.get("/subscriptions")).status_code == 401
        assert (await client.get("/deliveries")).status_code == 401
        authorised = await client.get("/subscriptions", headers={"Authorization": "Bearer k1"})
        assert authorised.status_code == 200


def test_config_defaults_are_sane() -> None:
    config = NotifierConfig()
    assert config.lease > config.timeout


async def test_private_addresses_are_refused_unless_allowed(
    settings, receiver, bus, run_notifier
) -> None:
    settings = settings.model_copy(update={"allow_private_urls": False})
    loopback = receiver.endpoint("/private")
    request_id = new_id()
    async with run_notifier(settings) as (_, client):
        refused = await client.post("/subscriptions", json={"url": loopback})
        assert refused.status_code == 422
        assert refused.json()["detail"][0]["type"] == "url_refused"
        await publish(bus, received(request_id, loopback))
        [delivery] = await wait_until(lambda: _finished(client, request_id), "the refusal")
    assert delivery["status"] == "failed"  # final: asking again would not change it
    [attempt] = delivery["attempts"]
    assert attempt["status_code"] is None and attempt["error"].startswith("url_refused")
    assert receiver.to("/private") == []


# Subscriptions and the delivery log: the API's rules ---------------------------------


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("https://hooks.example.com/in\u200b", "invisible character"),
        ("https://user:pw@hooks.example.com/in", "must not contain credentials"),
        ("https://hooks.example.com/ahttps://hooks.example.com/b", "two URLs run together"),
    ],
)
async def test_a_subscription_meets_the_rules_of_a_webhook_url_given_at_upload(
    settings, run_notifier, url: str, reason: str
) -> None:
    async with run_notifier(settings) as (_, client):
        refused = await client.post("/subscriptions", json={"url": url})
    assert refused.status_code == 422
    assert reason in refused.json()["detail"][0]["msg"]


def test_subscription_urls_are_normalised() -> None:
    assert normalise_url("HTTPS://Example.COM:443/Hook?a=B") == "https://example.com/Hook?a=B"
    assert normalise_url("http://EXAMPLE.com:80/x") == "http://example.com/x"
    assert normalise_url("http://example.com:8080/x") == "http://example.com:8080/x"
    assert normalise_url("https://[::1]:443/x") == "https://[::1]/x"


async def test_creating_an_equal_subscription_returns_the_existing_one(
    settings, receiver, run_notifier
) -> None:
    hook = receiver.endpoint("/same")
    shouting = hook.replace("http://", "HTTP://")
    async with run_notifier(settings) as (_, client):
        created = await client.post("/subscriptions", json={"url": hook})
        assert created.status_code == 201
        for same in (
            {"url": hook},
            {"url": shouting},
            {"url": hook, "event_types": list(reversed(created.json()["event_types"]))},
        ):
            again = await client.post("/subscriptions", json=same)
            assert again.status_code == 200, same
            assert again.json() == created.json()
        # Other webhook types make another subscription, stored under the normalised URL.
        finals = await client.post(
            "/subscriptions", json={"url": shouting, "event_types": ["request.completed"]}
        )
        assert finals.status_code == 201
        assert finals.json()["url"] == hook
        assert len((await client.get("/subscriptions")).json()) == 2


async def _first_attempt_logged(client, request_id: str) -> list | None:
    log = await deliveries(client, request_id)
    return log if log and all(d["attempts"] for d in log) else None


async def test_deleting_one_of_two_subscriptions_to_an_endpoint_keeps_its_deliveries(
    settings, receiver, bus, run_notifier
) -> None:
    settings = quick_retries(settings, 60)  # after one failure the delivery waits, pending
    hook = receiver.endpoint("/shared", default=Response(status=500))
    request_id = new_id()
    async with run_notifier(settings) as (_, client):
        every = (await client.post("/subscriptions", json={"url": hook})).json()
        received_only = await client.post(
            "/subscriptions", json={"url": hook, "event_types": ["request.received"]}
        )
        assert received_only.status_code == 201
        await publish(bus, received(request_id))
        [delivery] = await wait_until(
            lambda: _first_attempt_logged(client, request_id), "a failed first attempt"
        )
        assert delivery["status"] == "pending" and delivery["subscription_id"] == every["id"]

        assert (await client.delete(f"/subscriptions/{every['id']}")).status_code == 204
        [kept] = await deliveries(client, request_id)
        assert kept["status"] == "pending"  # the other subscription still wants it
        assert kept["subscription_id"] == received_only.json()["id"]

        # Once no subscription wants it, it is cancelled.
        assert (await client.delete(f"/subscriptions/{kept['subscription_id']}")).status_code == 204
        [cancelled] = await deliveries(client, request_id)
    assert cancelled["status"] == "cancelled" and cancelled["next_attempt_at"] is None


async def test_retrying_a_delivery_nobody_subscribes_to_any_more_is_refused(
    settings, receiver, bus, run_notifier
) -> None:
    settings = quick_retries(settings, 60)
    hook = receiver.endpoint("/left", Response(status=500))  # then 200
    request_id = new_id()
    async with run_notifier(settings) as (_, client):
        subscription = (await client.post("/subscriptions", json={"url": hook})).json()
        await publish(bus, received(request_id))
        [delivery] = await wait_until(
            lambda: _first_attempt_logged(client, request_id), "a failed first attempt"
        )
        await client.delete(f"/subscriptions/{subscription['id']}")

        refused = await client.post(f"/deliveries/{delivery['id']}/retry")
        assert refused.status_code == 409
        assert "subscribe the endpoint again" in refused.json()["detail"]
        assert (await _status_of(client, delivery["id"], "cancelled")) is not None

        # Subscribed again, the endpoint can have it; the delivery joins the new subscription.
        again = (await client.post("/subscriptions", json={"url": hook})).json()
        retried = await client.post(f"/deliveries/{delivery['id']}/retry")
        assert retried.status_code == 202
        assert retried.json()["subscription_id"] == again["id"]
        await wait_until(lambda: _status_of(client, delivery["id"], "delivered"), "the retry")
    assert [d.status for d in receiver.to("/left")] == [500, 200]


async def test_subscriptions_with_impossible_ports_or_unknown_fields_are_refused(
    settings, run_notifier
) -> None:
    async with run_notifier(settings) as (_, client):
        for url in (
            "https://example.com:0/hook",
            "https://example.com:99999/hook",
            "https://example.com:http/hook",
        ):
            refused = await client.post("/subscriptions", json={"url": url})
            assert refused.status_code == 422, url
            assert "port must be a number from 1 to 65535" in refused.json()["detail"][0]["msg"]
        misspelt = await client.post(
            "/subscriptions",
            json={"url": "https://example.com/hook", "event_type": ["request.completed"]},
        )
        assert misspelt.status_code == 422
        [problem] = misspelt.json()["detail"]
        assert problem["type"] == "extra_forbidden" and problem["loc"] == ["body", "event_type"]
        assert (await client.get("/subscriptions")).json() == []


async def test_an_unknown_delivery_status_is_refused_naming_the_valid_ones(
    settings, run_notifier
) -> None:
    async with run_notifier(settings) as (_, client):
        refused = await client.get("/deliveries", params={"status": "bogus"})
        assert refused.status_code == 422
        message = refused.json()["detail"][0]["msg"]
        assert all(f"'{name}'" in message for name in ("pending", "delivered", "failed"))
        assert "'cancelled'" in message
        assert (await client.get("/deliveries", params={"status": "failed"})).json() == []


async def test_deliveries_are_listed_newest_first_and_paged_back_with_before(
    settings, receiver, bus, run_notifier
) -> None:
    # Three endpoints per request: their deliveries share a created_at, so paging by
    # time alone would skip some; the delivery-id cursor must not.
    hook = receiver.endpoint("/own")
    request_ids = [new_id() for _ in range(3)]
    async with run_notifier(settings) as (_, client):
        for path in ("/a", "/b"):
            await client.post("/subscriptions", json={"url": receiver.endpoint(path)})
        for request_id in request_ids:  # one after another: each request is newer
            await publish(bus, received(request_id, hook))
            await wait_until(
                lambda request_id=request_id: _delivered(client, request_id), "three deliveries"
            )
        everything = (await client.get("/deliveries")).json()
        pages = await _pages(client, limit=2)
        newest = everything[0]["created_at"]
        older = (await client.get("/deliveries", params={"before": newest})).json()
        refused = await client.get("/deliveries", params={"before": "not-a-cursor"})

    newest_first = [request_id for request_id in reversed(request_ids) for _ in range(3)]
    assert [d["request_id"] for d in everything] == newest_first
    assert [len(page) for page in pages] == [2, 2, 2, 2, 1]
    assert [d["id"] for page in pages for d in page] == [d["id"] for d in everything]
    assert older == everything[3:]  # a time cursor: strictly older than it
    assert refused.status_code == 422
    assert refused.json()["detail"][0]["loc"] == ["query", "before"]


async def _pages(client: httpx.AsyncClient, limit: int) -> list[list[dict[str, Any]]]:
    """Every page, following `before`; a cursor that goes nowhere ends it too."""
    pages: list[list[dict[str, Any]]] = []
    params: dict[str, Any] = {"limit": limit}
    while len(pages) < 10 and (page := (await client.get("/deliveries", params=params)).json()):
        pages.append(page)
        params["before"] = page[-1]["id"]
    return pages


async def test_webhook_attempts_are_counted_in_the_metrics(
    settings, receiver, bus, run_notifier
) -> None:
    hook = receiver.endpoint("/metered")
    request_id = new_id()
    async with run_notifier(settings) as (_, client):
        _, before = await scrape(client)
        await publish(bus, *lifecycle(request_id, hook))
        await wait_until(lambda: receiver.types("/metered") == LIFECYCLE, "three webhooks")
        await wait_until(lambda: _finished(client, request_id), "the attempts recorded")
        image_type = "io.imgpipe.image.processed.v1"
        consumed = "imgpipe_events_consumed_total"

        async def all_consumed() -> tuple[str, Samples] | None:
            # An image's event is counted once its batch is stored and it is acked, which
            # may come after the webhook it led to.
            text, after = await scrape(client)
            counted = moved(before, after, consumed, queue="notifier", type=image_type)
            return (text, after) if counted == 3 else None

        text, after = await wait_until(all_consumed, "three image events counted")
    assert moved(before, after, "imgpipe_webhook_attempts_total", outcome="delivered") == 3
    assert moved(before, after, "imgpipe_webhook_duration_seconds_count") == 3
    promtool_check(text)


TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def traced(event: CloudEvent) -> CloudEvent:
    return event.model_copy(update={"traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01"})


async def test_every_webhook_post_carries_the_request_s_trace(
    settings, receiver, bus, run_notifier
) -> None:
    """Retries too, by a new instance after a restart: the trace is kept with the delivery."""
    settings = quick_retries(settings, 0.5, 0.5, 0.5, 0.5)
    hook = receiver.endpoint("/traced", Response(status=503))
    request_id = new_id()
    async with run_notifier(settings) as (_, client):
        await publish(bus, *(traced(event) for event in lifecycle(request_id, hook)))
        await wait_until(lambda: _attempted(client, request_id), "a first failed attempt")
    async with run_notifier(settings) as (_, client):
        await wait_until(lambda: _delivered(client, request_id), "every webhook")
    posts = receiver.to("/traced")
    assert [d.status for d in posts][:2] == [503, 200] and len(posts) == 4
    assert {d.headers["traceparent"].split("-")[1] for d in posts} == {TRACE_ID}


# Managing requests: cancel, retry rounds, deletion ------------------------------------


async def _sentinel(bus: Bus, receiver: Receiver, path: str) -> None:
    """With prefetch 1, once a later request's webhook arrives every event published
    before it has been handled."""
    await publish(bus, received(new_id(), receiver.endpoint(path)))
    await wait_until(lambda: receiver.types(path), "the sentinel webhook")


async def test_a_cancelled_request_gets_a_cancelled_webhook_after_the_others(
    settings, receiver, bus, run_notifier
) -> None:
    settings = settings.model_copy(update={"prefetch": 1})  # events handled in queue order
    hook = receiver.endpoint("/hook")
    cancels = receiver.endpoint("/cancels")
    request_id = new_id()
    # Two images ended, the third never started: the processor counts what it knows.
    stop = events.cancelled(request_id, ok=1, failed=1, total=3)
    async with run_notifier(settings) as (_, client):
        only = {"url": cancels, "event_types": ["request.cancelled"]}
        assert (await client.post("/subscriptions", json=only)).status_code == 201
        await publish(
            bus,
            received(request_id, hook),
            processed(request_id, 0, 0),
            processed(request_id, 0, 1, ok=False),
            stop,
            stop,  # redelivered
        )
        expected = [*LIFECYCLE[:2], "request.cancelled"]
        await wait_until(lambda: receiver.types("/hook") == expected, "three webhooks")
        await _sentinel(bus, receiver, "/sentinel")
        log = await deliveries(client, request_id)

    assert receiver.bad_signatures == []
    assert receiver.types("/hook") == expected  # nothing twice
    assert receiver.types("/cancels") == ["request.cancelled"]
    assert [(d["event_type"], d["round"]) for d in log if d["endpoint"] == hook] == [
        (kind, 0) for kind in expected
    ]
    final = receiver.to("/hook")[-1].payload
    assert final["status"] == "cancelled" and final["round"] == 0
    assert final["counts"] == {"total": 3, "ok": 1, "failed": 1}
    assert final["timestamp"] == "2026-01-02T03:04:35Z"  # cancelled_at
    assert final["output_csv_url"].endswith(f"/status/{request_id}/output.csv")
    assert final["bytes"] == {"images": 1, "input": 1000, "output": 300, "ratio": 0.3}
    shoe, hat = final["products"]
    assert shoe["output_urls"] == [f"http://media/{request_id}/0-0.jpg", None]
    assert shoe["errors"][1] == {"code": "download_failed", "message": "HTTP 404"}
    assert hat["output_urls"] == [None] and hat["errors"] == [None]  # never started


async def test_a_retry_round_sends_processing_and_its_final_again_once_each(
    settings, receiver, bus, run_notifier
) -> None:
    settings = settings.model_copy(update={"prefetch": 1})  # events handled in queue order
    hook = receiver.endpoint("/hook")
    request_id = new_id()
    first_run = [
        received(request_id, hook),
        processed(request_id, 0, 0, ok=False),
        processed(request_id, 0, 1, ok=False),
        processed(request_id, 1, 0, ok=False),
        completed(request_id, ok=0, failed=3),
    ]
    retry = events.retry_started(request_id, 1, ["0-0", "0-1"])
    second_run = [
        events.in_round(processed(request_id, 0, 0), 1),
        events.in_round(processed(request_id, 0, 1), 1),
    ]
    done_again = events.in_round(completed(request_id, ok=2, failed=1), 1)
    async with run_notifier(settings) as (_, client):
        # Every event twice, and the first run's events once more after the retry began,
        # as redeliveries would bring them: none of that may send anything twice.
        await publish(bus, *first_run, *first_run, retry, retry)
        await publish(bus, *first_run[1:], *second_run, first_run[1], *second_run, done_again)
        await publish(bus, done_again, retry, first_run[-1])
        expected = [*LIFECYCLE[:2], "request.error", "request.processing", "request.completed"]
        await wait_until(lambda: receiver.types("/hook") == expected, "five webhooks")
        await _sentinel(bus, receiver, "/sentinel")
        log = await deliveries(client, request_id)

    assert receiver.bad_signatures == []
    got = receiver.to("/hook")
    assert [d.payload["type"] for d in got] == expected  # nothing twice, in order
    assert [d.payload["round"] for d in got] == [0, 0, 0, 1, 1]
    assert [(d["event_type"], d["round"]) for d in log] == list(zip(expected, [0, 0, 0, 1, 1]))
    # A receiver deduping on webhook-id gets every one of them.
    assert len({d.headers["webhook-id"] for d in got}) == 5

    error, processing_again, final = (d.payload for d in got[2:])
    assert error["counts"] == {"total": 3, "ok": 0, "failed": 3}
    assert error["products"][0]["output_urls"] == [None, None]
    assert processing_again["status"] == "processing"
    assert processing_again["timestamp"] == "2026-01-02T03:14:05Z"  # the retry's start
    assert processing_again["counts"] == {"total": 3, "ok": 0, "failed": 3}  # before it
    assert final["counts"] == {"total": 3, "ok": 2, "failed": 1}
    # The retried images' new outcomes, though the first run's came again after them.
    shoe, hat = final["products"]
    assert shoe["output_urls"] == [
        f"http://media/{request_id}/0-0.jpg",
        f"http://media/{request_id}/0-1.jpg",
    ]
    assert shoe["errors"] == [None, None]
    assert hat["output_urls"] == [None] and hat["errors"][0]["code"] == "download_failed"
    assert final["bytes"] == {"images": 2, "input": 2000, "output": 600, "ratio": 0.3}


async def test_a_late_first_run_completion_after_a_retry_started_sends_nothing(
    settings, receiver, bus, run_notifier
) -> None:
    settings = settings.model_copy(update={"prefetch": 1})  # events handled in queue order
    hook = receiver.endpoint("/hook")
    request_id = new_id()
    *first_run, done = lifecycle(request_id, hook)
    async with run_notifier(settings) as (_, client):
        await publish(bus, *first_run, done)
        await wait_until(lambda: receiver.types("/hook") == LIFECYCLE, "three webhooks")
        await publish(bus, events.retry_started(request_id, 1, ["0-1"]))
        retrying = [*LIFECYCLE, "request.processing"]
        await wait_until(lambda: receiver.types("/hook") == retrying, "processing again")

        # Round 0's end again (and one saying otherwise): the request is in round 1.
        await publish(bus, done, completed(request_id, ok=0, failed=3))
        await _sentinel(bus, receiver, "/sentinel")
        assert receiver.types("/hook") == retrying
        assert len(await deliveries(client, request_id)) == 4

        # Round 1's end still goes out.
        await publish(bus, events.in_round(processed(request_id, 0, 1), 1))
        await publish(bus, events.in_round(completed(request_id, ok=3), 1))
        await wait_until(
            lambda: receiver.types("/hook") == [*retrying, "request.completed"], "round 1's end"
        )
    final = receiver.to("/hook")[-1].payload
    assert final["round"] == 1 and final["counts"] == {"total": 3, "ok": 3, "failed": 0}


def _mentions(doc: Any, request_id: str) -> bool:
    return request_id in repr(doc)


async def _documents_mentioning(settings: Settings, request_id: str) -> dict[str, int]:
    """Per collection of the notifier's database, the documents holding the request id."""
    client = mongo.connect(settings)
    try:
        db = mongo.service_database(client, settings, "notifier")
        counts: dict[str, int] = {}
        for name in sorted(await db.list_collection_names()):
            docs = await db[name].find().to_list()
            counts[name] = sum(_mentions(doc, request_id) for doc in docs)
        return counts
    finally:
        await client.close()


async def test_deleting_a_request_drops_its_pending_retries_and_every_document_of_it(
    settings, receiver, bus, run_notifier
) -> None:
    settings = quick_retries(quick_prefetch_1(settings), 5.0, 5.0)
    hook = receiver.endpoint("/down", default=Response(status=500))
    request_id = new_id()
    async with run_notifier(settings) as (_, client):
        await publish(bus, *lifecycle(request_id, hook))

        async def held() -> list | None:  # all three planned, the first waiting to retry
            log = await deliveries(client, request_id)
            return log if len(log) == 3 and log[0]["attempts"] else None

        log = await wait_until(held, "a failed first attempt, the others behind it")
        assert [d["status"] for d in log] == ["pending"] * 3
        before = await _documents_mentioning(settings, request_id)
        for name in ("requests", "rows", "images", "deliveries"):
            assert before[name] > 0, (name, before)

        await publish(bus, events.deleted(request_id))
        await wait_until(
            lambda: _nothing_left(settings, request_id), "every document of the request gone"
        )
        receiver.set_default("/down", Response(status=200))
        # A redelivered event of the deleted request does not bring it back.
        await publish(bus, received(request_id, hook), processed(request_id, 0, 0))
        await _sentinel(bus, receiver, "/sentinel")
        await asyncio.sleep(5.0 * 1.2 + 1)  # past the retry's time
        after = await _documents_mentioning(settings, request_id)
        assert await deliveries(client, request_id) == []

    assert set(after) >= set(before)
    assert all(count == 0 for count in after.values()), after
    assert [d.status for d in receiver.to("/down")] == [500]  # the retry never went


async def _nothing_left(settings: Settings, request_id: str) -> bool:
    return not any((await _documents_mentioning(settings, request_id)).values())


def quick_prefetch_1(settings: Settings) -> Settings:
    return settings.model_copy(update={"prefetch": 1})  # events handled in queue order
