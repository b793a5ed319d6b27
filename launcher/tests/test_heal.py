"""`imgpipe up` heals: a service killed mid-request (as the OOM killer would) comes back while
the others keep answering, and the request completes with every image once. A service that
keeps dying is a crash loop: everything stops, and the message names it.

Real parts: the real broker, the embedded database the launcher starts, real processes.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from imgpipe.contracts.settings import Settings
from tests.support.faults import csv_upload, get_json, output_urls, wait_finished, wait_until
from tests.support.http_server import LoopbackServer, Response, loopback_server
from tests.support.images import jpeg_bytes
from tests.support.namespaces import remove_namespace
from tests.support.up import Up, alive, descendants, kill_groups, start_up, wait_until_gone

PORTS = {
    "ingest": "ingest_port",
    "processor": "processor_port",
    "status": "status_port",
    "notifier": "notifier_port",
}
# One image worker and one message in hand: a request stays in flight long enough to be
# interrupted (a job holds 8 images; 24 images are three jobs, one at a time).
SLOW = {"IMGPIPE_WORKERS": "1", "IMGPIPE_PREFETCH": "1"}
IMAGES = 24

pytestmark = pytest.mark.timeout(240)


def url(up: Up, service: str, path: str = "") -> str:
    return f"http://127.0.0.1:{getattr(up.settings, PORTS[service])}{path}"


@pytest.fixture(scope="module")
def healing(
    amqp_url: str, mongo_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Up]:
    """One `imgpipe up`, with the database it starts itself, shared by the kill tests: each
    test leaves every service running again, which is what it checks."""
    settings = Settings(
        amqp_url=amqp_url,
        mongodb_url=mongo_url,  # for remove_namespace only: the launcher starts its own
        IMGPIPE_DATA_DIR=tmp_path_factory.mktemp("heal") / "data",
        IMGPIPE_NAMESPACE="t" + uuid.uuid4().hex[:10],
    )
    up = start_up(settings, "--quiet", embedded=True, **SLOW)
    try:
        up.wait_until_up()
        yield up
    finally:
        code = up.stop()
        remove_namespace(settings)
    assert code == 0, up.output
    assert "all services stopped" in up.output


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as client:
        yield client


@contextmanager
def watching_health(up: Up, services: list[str]) -> Iterator[list[str]]:
    """Polls each service's /healthz until the block ends; yields the failures seen."""
    failures: list[str] = []
    done = threading.Event()

    def poll() -> None:
        with httpx.Client(timeout=5) as http:
            while not done.is_set():
                for service in services:
                    try:
                        answer = http.get(url(up, service, "/healthz"))
                        if answer.status_code != 200:
                            failures.append(f"{service}: HTTP {answer.status_code}")
                    except httpx.HTTPError as error:
                        failures.append(f"{service}: {error!r}")
                done.wait(0.2)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    try:
        yield failures
    finally:
        done.set()
        watcher.join(10)


def submit(client: httpx.Client, up: Up, images: list[str]) -> str:
    upload = client.post(
        url(up, "ingest", "/upload"),
        files={"file": ("products.csv", csv_upload(images), "text/csv")},
    )
    assert upload.status_code == 202, upload.text
    return url(up, "status", f"/status/{upload.json()['request_id']}")


def done_count(client: httpx.Client, status_url: str) -> int:
    body = get_json(client, status_url)
    return body["progress"]["ok"] + body["progress"]["failed"] if body else 0


def wait_mid_request(client: httpx.Client, server: LoopbackServer, status_url: str) -> None:
    """Until some images are done and others are being downloaded right now."""

    def mid_request() -> bool:
        done = done_count(client, status_url)
        started = [r for r in list(server.requests) if r.path.endswith(".jpg")]
        return done >= 4 and len(started) > done

    wait_until(mid_request, 120, "the request to be mid-way with downloads in flight", 0.05)


@pytest.mark.parametrize("service", ["processor", "status", "notifier", "ingest"])
def test_a_service_killed_mid_request_is_restarted_and_the_request_completes(
    healing: Up, client: httpx.Client, service: str
) -> None:
    up = healing
    others = [name for name in PORTS if name != service]
    with loopback_server() as server:
        images = [
            server.add(
                f"/{service}/{i}.jpg",
                Response(jpeg_bytes(320, 240, seed=i), content_type="image/jpeg", delay=0.5),
            )
            for i in range(IMAGES)
        ]
        status_url = submit(client, up, images)
        wait_mid_request(client, server, status_url)
        pid = up.pid_of(service)
        assert pid is not None, up.output

        with watching_health(up, others) as failures:
            os.kill(pid, signal.SIGKILL)  # the service alone, as the OOM killer would
            assert done_count(client, status_url) < IMAGES, "killed too late"
            new_pid = wait_until(
                lambda: (found := up.pid_of(service)) != pid and found,
                30,
                f"{service} to be restarted",
            )
            wait_until(
                lambda: f"imgpipe: {service} is back (pid {new_pid})" in up.lines,
                90,
                f"{service} to answer /readyz again",
            )
            final = wait_finished(client, status_url, timeout=180)

    assert failures == [], f"another service stopped answering /healthz: {failures[:5]}"
    said = f"{service} (pid {pid}) exited unexpectedly (killed by SIGKILL); restarting it in 1s"
    assert f"imgpipe: {said}" in up.output
    log = (up.settings.data_dir / "logs" / f"{service}.log").read_text(errors="replace")
    assert said in log and "imgpipe: restarting" in log

    assert final["status"] == "completed", final
    assert final["progress"] == {"total": IMAGES, "ok": IMAGES, "failed": 0}
    for product in final["products"]:
        assert all(product["output_urls"]) and not any(product["errors"]), product
    outputs = output_urls(client, status_url)
    assert len(outputs) == IMAGES and len(set(outputs)) == IMAGES, outputs
    assert client.get(outputs[0]).status_code == 200
    for name in PORTS:  # and everything still serves for the next test
        assert client.get(url(up, name, "/readyz")).status_code == 200, name


@contextmanager
def port_taken(port: int, timeout: float = 5) -> Iterator[None]:
    """Listen on `port` as soon as it is free again, so a service cannot bind it."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        deadline = time.monotonic() + timeout
        while True:
            try:
                sock.bind(("127.0.0.1", port))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        sock.listen()
        yield


def test_a_service_that_keeps_dying_stops_everything_and_is_named(settings: Settings) -> None:
    up = start_up(settings, "--quiet", embedded=False, IMGPIPE_RESTART_BACKOFF="0.1")
    try:
        up.wait_until_up()
        pid = up.pid_of("notifier")
        assert pid is not None, up.output
        os.kill(pid, signal.SIGKILL)
        # Every restart now fails at once: the port the notifier must listen on is taken.
        with port_taken(up.settings.notifier_port):
            code = up.process.wait(90)
        time.sleep(0.5)  # the last lines
    finally:
        if up.process.poll() is None:
            up.stop()

    assert code == 1, up.output
    said = "imgpipe: error: notifier crashed 5 times within 60s (last: exit code "
    assert said in up.output, up.output
    assert "address already in use" in up.output  # the last lines of its log
    assert f"Last lines of {up.settings.data_dir.resolve() / 'logs' / 'notifier.log'}" in (
        up.output
    )
    # The first start and four restarts, waiting 0.1, 0.2, 0.4 and 0.8 s.
    assert up.output.count("imgpipe: started notifier (pid") == 5
    assert "restarting it in 0.8s (4 crash(es) in the last 60s" in up.output
    assert "all services stopped" in up.output
    for name in ("ingest", "processor", "status"):
        with pytest.raises(httpx.ConnectError):
            httpx.get(url(up, name, "/healthz"), timeout=5)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_restarted_service_still_dies_with_a_launcher_killed_with_sigkill(
    settings: Settings,
) -> None:
    up = start_up(settings, "--quiet", embedded=False)
    started: set[int] = set()
    try:
        up.wait_until_up()
        pid = up.pid_of("status")
        assert pid is not None, up.output
        os.kill(pid, signal.SIGKILL)
        wait_until(
            lambda: f"imgpipe: status is back (pid {up.pid_of('status')})" in up.lines,
            60,
            "status to be restarted",
        )
        started = descendants(up.process.pid)
        assert up.pid_of("status") in started

        up.process.kill()  # the launcher itself, as the OOM killer would
        up.process.wait(30)

        survivors = wait_until_gone(started, timeout=30)
        assert survivors == [], f"outlived the launcher: {survivors}\n{up.output}"
    finally:
        kill_groups({pid for pid in started if alive(pid)})
        if up.process.poll() is None:
            up.process.kill()
