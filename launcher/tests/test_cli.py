"""`imgpipe` as a user runs it: real processes, the real broker, a real database."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from imgpipe.contracts.settings import Settings
from imgpipe.launcher.client import ImgpipeClient
from imgpipe.launcher.embedded import free_port
from tests.support.http_server import LoopbackServer, Response, loopback_server
from tests.support.images import jpeg_bytes, png_with_alpha_bytes
from tests.support.namespaces import remove_namespace
from tests.support.up import (
    IMGPIPE,
    Up,
    alive,
    descendants,
    kill_groups,
    launch_up,
    start_up,
    wait_until_gone,
)

SERVICE_PORTS = ("ingest_port", "processor_port", "status_port", "notifier_port")


def imgpipe(env: dict[str, str], *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*IMGPIPE, *args], env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree")
def test_up_starts_everything_with_an_embedded_database_and_sigterm_stops_it_all(
    settings: Settings,
) -> None:
    up = start_up(settings, "--quiet", embedded=True)
    try:
        up.wait_until_up()
        s = up.settings
        data = s.data_dir.resolve()
        assert f"POST http://127.0.0.1:{s.ingest_port}/upload" in up.output
        assert f"http://127.0.0.1:{s.status_port}/status/{{request_id}}" in up.output
        assert f"http://127.0.0.1:{s.ingest_port}/docs" in up.output
        assert f"http://127.0.0.1:{s.status_port}/docs" in up.output
        assert f"http://127.0.0.1:{s.notifier_port}" in up.output
        assert f"local: {data / 'media'}" in up.output
        assert "embedded SecantusDB" in up.output
        assert "WARNING: IMGPIPE_ALLOW_PRIVATE_URLS is on" in up.output
        for port in SERVICE_PORTS:
            answer = httpx.get(f"http://127.0.0.1:{getattr(s, port)}/readyz", timeout=5)
            assert answer.status_code == 200, port
        assert (data / "mongo").is_dir()
        assert (data / "logs" / "ingest.log").is_file()
        started = descendants(up.process.pid)
        assert len(started) >= 5  # four services and the database
    finally:
        code = up.stop()
    assert code == 0, up.output
    assert "all services stopped" in up.output
    assert [pid for pid in started if alive(pid)] == []
    for port in SERVICE_PORTS:
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{getattr(up.settings, port)}/readyz", timeout=5)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_launcher_killed_with_sigkill_takes_its_children_with_it_and_up_starts_again(
    settings: Settings,
) -> None:
    # A fixed database port: a database left over from the first run would answer the second.
    args = ("--quiet", "--mongo-port", str(free_port()))
    first = start_up(settings, *args, embedded=True)
    started: set[int] = set()
    try:
        first.wait_until_up()
        started = descendants(first.process.pid)
        assert len(started) >= 5  # four services and the database

        first.process.kill()
        first.process.wait(30)

        survivors = wait_until_gone(started, timeout=30)
        assert survivors == [], f"outlived the launcher: {survivors}"
    finally:
        kill_groups({pid for pid in started if alive(pid)})
        if first.process.poll() is None:
            first.process.kill()

    second = launch_up(first.settings, first.env, *args)
    try:
        second.wait_until_up()
        assert "embedded SecantusDB" in second.output
    finally:
        code = second.stop()
    assert code == 0, second.output
    assert "all services stopped" in second.output


@pytest.fixture(scope="module")
def running(
    mongo_url: str, amqp_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Up]:
    """One `imgpipe up` on the test database for the submit and status tests."""
    settings = Settings(
        amqp_url=amqp_url,
        mongodb_url=mongo_url,
        IMGPIPE_DATA_DIR=tmp_path_factory.mktemp("up") / "data",
        IMGPIPE_NAMESPACE="t" + uuid.uuid4().hex[:10],
    )
    up = start_up(settings, "--quiet", embedded=False)
    try:
        up.wait_until_up()
        yield up
    finally:
        up.stop()
        remove_namespace(settings)


@pytest.fixture
def images() -> Iterator[LoopbackServer]:
    with loopback_server() as server:
        yield server


def write_csv(path: Path, rows: list[list[str]]) -> Path:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["S. No.", "Product Name", "Input Image Urls"])
    writer.writerows(rows)
    path.write_text(text.getvalue())
    return path


def test_submit_waits_and_saves_the_output_csv(
    running: Up, images: LoopbackServer, tmp_path: Path
) -> None:
    shoe = images.add("/shoe.jpg", Response(jpeg_bytes(seed=1), content_type="image/jpeg"))
    logo = images.add("/logo.png", Response(png_with_alpha_bytes(seed=2), content_type="image/png"))
    hat = images.add("/hat.jpg", Response(jpeg_bytes(seed=3), content_type="image/jpeg"))
    products = write_csv(
        tmp_path / "products.csv",
        [["1", "Shoe", f"{shoe},{logo}"], ["2", "Hat", hat]],
    )
    output = tmp_path / "out" / "result.csv"

    result = imgpipe(
        running.env,
        "submit",
        str(products),
        "--wait",
        *("--quality", "60", "--format", "webp", "--max-side", "320"),
        *("--output", str(output)),
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "request id: " in result.stdout
    request_id = result.stdout.split("request id: ", 1)[1].split()[0]
    status_port = running.settings.status_port
    assert f"http://127.0.0.1:{status_port}/status/{request_id}" in result.stdout
    assert "completed" in result.stdout
    assert "3 ok, 0 failed, 3 images" in result.stdout
    assert f"/status/{request_id}/output.csv" in result.stdout
    rows = list(csv.DictReader(output.read_text().splitlines()))
    assert [row["Product Name"] for row in rows] == ["Shoe", "Hat"]
    outputs = rows[0]["Output Image Urls"].split(",")
    assert len(outputs) == 2
    served = httpx.get(outputs[0].strip(), timeout=10)
    assert served.status_code == 200
    assert outputs[0].strip().endswith(".webp") and served.headers["content-type"] == "image/webp"
    assert Image.open(io.BytesIO(served.content)).size == (320, 240)  # from 640x480
    assert "bytes: " in result.stdout and "over 3 images" in result.stdout

    status = imgpipe(running.env, "status", request_id)
    assert status.returncode == 0, status.stderr
    assert '"status": "completed"' in status.stdout
    assert '"total": 3' in status.stdout
    assert '"format": "webp"' in status.stdout and '"max_side": 320' in status.stdout


def test_a_request_over_one_page_is_paged_through_by_status_and_submit(
    running: Up, images: LoopbackServer, tmp_path: Path
) -> None:
    """1,050 products (one stored image: the same URL everywhere) and a failure in the
    last row, past the first page of 1,000: the CLI lists it and prints every product."""
    shoe = images.add("/shoe.jpg", Response(jpeg_bytes(seed=4), content_type="image/jpeg"))
    gone = images.add("/gone.jpg", Response(b"not found", 404, "text/plain"))
    rows = [[str(n), f"Product {n}", shoe] for n in range(1, 1050)]
    products = write_csv(tmp_path / "large.csv", [*rows, ["1050", "Last", gone]])
    output = tmp_path / "large-out.csv"

    result = imgpipe(running.env, "submit", str(products), "--wait", "--output", str(output))

    assert result.returncode == 0, result.stdout + result.stderr
    assert "1049 ok, 1 failed, 1050 images" in result.stdout
    assert f"failed: S. No. 1050 (Last) {gone}: " in result.stdout
    request_id = result.stdout.split("request id: ", 1)[1].split()[0]
    written = list(csv.DictReader(output.read_text().splitlines()))  # streamed by status
    assert [row["S. No."] for row in written] == [str(n) for n in range(1, 1051)]
    assert written[-1]["Output Image Urls"] == ""

    full = imgpipe(running.env, "status", request_id, "--full")
    assert full.returncode == 0, full.stderr
    assert full.stdout.count('"serial_number"') == 1050
    assert '"next": null' in full.stdout
    brief = imgpipe(running.env, "status", request_id)
    assert brief.returncode == 0, brief.stderr
    assert "S. No. 1050 (Last)" in brief.stdout
    with client_of(running) as client:
        first = client.status(request_id)
        assert (len(first["products"]), first["products_total"]) == (1000, 1050)
        serials = [p["serial_number"] for p in client.products(request_id, first)]
        assert serials == [str(n) for n in range(1, 1051)]


def test_submit_names_each_problem_of_a_bad_csv_with_its_line(running: Up, tmp_path: Path) -> None:
    bad = write_csv(
        tmp_path / "bad.csv",
        [["1", "Shoe", "https://example.com/a.jpg"], ["2", "", "ftp://example.com/b.jpg"]],
    )

    result = imgpipe(running.env, "submit", str(bad))

    assert result.returncode == 1
    assert "error: ingest answered HTTP 4" in result.stderr
    assert "line 3" in result.stderr


def client_of(up: Up) -> ImgpipeClient:
    s = up.settings
    return ImgpipeClient(f"http://127.0.0.1:{s.ingest_port}", f"http://127.0.0.1:{s.status_port}")


def test_submit_sends_one_idempotency_key_per_call(
    running: Up, images: LoopbackServer, tmp_path: Path
) -> None:
    shoe = images.add("/key.jpg", Response(jpeg_bytes(seed=4), content_type="image/jpeg"))
    products = write_csv(tmp_path / "p.csv", [["1", "Shoe", shoe]])
    with client_of(running) as client:
        first = client.submit(products, idempotency_key="cli-test-key")
        resent = client.submit(products, idempotency_key="cli-test-key")  # as a retry would
        second_call = client.submit(products)
        third_call = client.submit(products)
    assert resent.request_id == first.request_id
    assert len({first.request_id, second_call.request_id, third_call.request_id}) == 3


def test_list_pages_through_requests_newest_first(
    running: Up, images: LoopbackServer, tmp_path: Path
) -> None:
    hat = images.add("/list.jpg", Response(jpeg_bytes(seed=5), content_type="image/jpeg"))
    products = write_csv(tmp_path / "p.csv", [["1", "Hat", hat], ["2", "Cap", hat]])
    submitted = []
    for _ in range(3):
        result = imgpipe(running.env, "submit", str(products))
        assert result.returncode == 0, result.stderr
        submitted.append(result.stdout.split("request id: ", 1)[1].split()[0])
    with client_of(running) as client:  # the status service hears of them a moment later
        for _ in range(200):
            listed = [item["request_id"] for item in client.list_requests(limit=200)["items"]]
            if set(submitted) <= set(listed):
                break
            time.sleep(0.1)

    rows: list[list[str]] = []
    args = ["list", "--limit", "2"]
    for _ in range(100):
        result = imgpipe(running.env, *args)
        assert result.returncode == 0, result.stderr
        header, *lines = result.stdout.splitlines()
        assert header.split() == [
            "REQUEST",
            "ID",
            "STATUS",
            "PROGRESS",
            "CREATED",
            "(UTC)",
            "PRODUCTS",
        ]
        rows += [line.split() for line in lines if not line.startswith("next page")]
        if not lines[-1].startswith("next page: imgpipe list --limit 2 --before "):
            break
        args = lines[-1].removeprefix("next page: imgpipe ").split()
    seen = [row[0] for row in rows]
    assert len(seen) == len(set(seen))  # each once
    assert [request_id for request_id in seen if request_id in submitted] == submitted[::-1]
    newest = rows[seen.index(submitted[-1])]
    assert newest[-1] == "2"  # products
    assert newest[1] in ("received", "processing", "completed")
    assert newest[2].endswith("/2")  # progress: done of 2 images


def test_status_of_an_unknown_request_is_an_error(running: Up) -> None:
    result = imgpipe(running.env, "status", "no-such-request")

    assert result.returncode == 1
    assert "unknown request" in result.stderr


def test_submit_without_a_running_system_says_so(tmp_path: Path) -> None:
    products = write_csv(tmp_path / "p.csv", [["1", "Shoe", "https://example.com/a.jpg"]])
    port = free_port()  # nothing listens there
    env = {**os.environ, "INGEST_PORT": str(port), "IMGPIPE_DATA_DIR": str(tmp_path)}

    result = imgpipe(env, "submit", str(products), timeout=60)

    assert result.returncode == 1
    assert "is `imgpipe up` running?" in result.stderr
    assert f"127.0.0.1:{port}/upload" in result.stderr


def test_webhook_secret_is_generated_once_and_kept(tmp_path: Path) -> None:
    env = {**os.environ, "IMGPIPE_DATA_DIR": str(tmp_path / "data")}
    env.pop("WEBHOOK_SECRET", None)

    first = imgpipe(env, "webhook-secret", timeout=60)
    second = imgpipe(env, "webhook-secret", timeout=60)

    assert first.returncode == 0
    assert first.stdout.startswith("whsec_")
    assert first.stdout == second.stdout
    assert (tmp_path / "data" / "webhook_secret").read_text().strip() == first.stdout.strip()
