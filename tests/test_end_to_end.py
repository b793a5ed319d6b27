"""The whole system as real processes on the real broker and database.

A user uploads a CSV, watches the status, downloads the output CSV and the images.
"""

from __future__ import annotations

import csv
import io
import json
import time

import httpx
import pytest
from PIL import Image
from standardwebhooks.webhooks import Webhook

from imgpipe.contracts.settings import Settings
from imgpipe.contracts.topology import Topology
from tests.support.external import ExternalConsumer
from tests.support.http_server import LoopbackServer, Recorded, Response, loopback_server
from tests.support.images import exif_rotated_jpeg_bytes, jpeg_bytes, png_with_alpha_bytes
from tests.support.system import running_system

LIFECYCLE = ["received", "processing", "completed"]


def build_catalogue(server: LoopbackServer) -> tuple[str, dict[str, bytes], list[list[str]]]:
    """12 products, 32 images: JPEGs, PNGs with alpha, an EXIF-rotated JPEG, a 404, a non-image."""
    inputs: dict[str, bytes] = {}
    rows: list[list[str]] = []
    for row in range(12):
        urls = []
        for position in range(3 if row < 8 else 2):
            path = f"/img/{row}-{position}"
            if row % 4 == 3 and position == 1:
                body, kind = png_with_alpha_bytes(seed=row), "image/png"
            else:
                body, kind = jpeg_bytes(800, 600, seed=row * 10 + position), "image/jpeg"
            # A short delay keeps the request in "processing" long enough to be seen.
            server.add(path, Response(body, content_type=kind, delay=0.2))
            inputs[server.url(path)] = body
            urls.append(server.url(path))
        rows.append([str(row + 1), f"Product {row + 1}", ",".join(urls)])
    rotated = server.add(
        "/img/rotated.jpg", Response(exif_rotated_jpeg_bytes(), content_type="image/jpeg")
    )
    inputs[rotated] = exif_rotated_jpeg_bytes()
    missing = server.url("/img/missing.jpg")  # the server answers 404
    not_image = server.add(
        "/img/page.html", Response(b"<html>hello</html>", content_type="image/jpeg")
    )
    rows.append(["13", "Rotated, missing and fake", f"{rotated},{missing},{not_image}"])
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\r\n")
    writer.writerow(["S. No.", "Product Name", "Input Image Urls"])
    writer.writerows(rows)
    return text.getvalue(), inputs, rows


def webhook_receiver(server: LoopbackServer, secret: str) -> list[dict]:
    seen: list[dict] = []

    def receive(request: Recorded) -> Response:
        headers = {k.lower(): v for k, v in request.headers.items()}
        seen.append(Webhook(secret).verify(request.body, headers))
        return Response(b"ok", 200)

    server.add("/hooks", receive)
    return seen


def poll_until_finished(
    client: httpx.Client, status_url: str, timeout: float = 240
) -> tuple[dict, list[str]]:
    observed: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = client.get(status_url)
        if response.status_code == 200:
            body = response.json()
            if not observed or observed[-1] != body["status"]:
                observed.append(body["status"])
            if body["status"] in ("completed", "error"):
                return body, observed
        else:
            assert response.status_code == 404, response.text  # not yet in the read model
        time.sleep(0.1)
    raise AssertionError(f"request did not finish; statuses seen: {observed}")


@pytest.mark.timeout(600)
def test_csv_to_compressed_images_status_and_output_csv(settings: Settings) -> None:
    external = ExternalConsumer(settings.amqp_url, Topology(settings.namespace))
    with loopback_server() as server, running_system(settings) as system, external:
        csv_text, inputs, rows = build_catalogue(server)
        hooks = webhook_receiver(server, settings.resolved_webhook_secret)
        with httpx.Client(timeout=30) as client:
            upload = client.post(
                f"{system.ingest_url}/upload",
                files={"file": ("products.csv", csv_text.encode(), "text/csv")},
                data={"webhook_url": server.url("/hooks")},
            )
            assert upload.status_code == 202, upload.text
            accepted = upload.json()
            assert accepted["status"] == "received"
            request_id = accepted["request_id"]
            status_url = f"{system.status_url}/status/{request_id}"

            final, observed = poll_until_finished(client, status_url)

            # Status moved forward through the lifecycle, never back.
            assert observed == [s for s in LIFECYCLE if s in observed]
            assert observed[-1] == "completed" and "processing" in observed
            assert final["progress"] == {"total": 35, "ok": 33, "failed": 2}

            products = final["products"]
            assert [p["serial_number"] for p in products] == [r[0] for r in rows]
            for product, row in zip(products, rows, strict=True):
                assert product["product_name"] == row[1]
                assert product["input_urls"] == row[2].split(",")
                assert len(product["output_urls"]) == len(product["input_urls"])
                assert len(product["errors"]) == len(product["input_urls"])

            last = products[-1]
            assert last["output_urls"][1] is None and last["errors"][1]["code"]
            assert last["output_urls"][2] is None and last["errors"][2]["code"]

            for product in products:
                for input_url, output_url in zip(product["input_urls"], product["output_urls"]):
                    if output_url is None:
                        continue
                    assert_compressed(client, inputs[input_url], output_url)

            output_csv = client.get(f"{status_url}/output.csv")
            assert output_csv.status_code == 200
            assert output_csv.headers["content-type"].startswith("text/csv")
            assert_output_csv_matches(output_csv.text, final["products"])

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(hooks) < 3:
            time.sleep(0.2)
        assert [hook["status"] for hook in hooks] == LIFECYCLE

        # The documented external consumer heard all three event types for the request.
        events = external.wait_for("io.imgpipe.request.completed.v1", request_id)
        types = {event["type"] for event in events if event["subject"] == request_id}
        assert types == {
            "io.imgpipe.request.received.v1",
            "io.imgpipe.image.processed.v1",
            "io.imgpipe.request.completed.v1",
        }


def assert_compressed(client: httpx.Client, original: bytes, output_url: str) -> None:
    response = client.get(output_url)
    assert response.status_code == 200, output_url
    source = Image.open(io.BytesIO(original))
    output = Image.open(io.BytesIO(response.content))
    output.load()
    assert len(response.content) < len(original), output_url
    if "A" in source.mode:
        assert output.format == "WEBP" and "A" in output.mode
    else:
        assert output.format == "JPEG"
    exif_orientation = source.getexif().get(0x0112, 1)
    expected = source.size[::-1] if exif_orientation in (5, 6, 7, 8) else source.size
    assert output.size == expected
    assert 0x0112 not in output.getexif()


def assert_output_csv_matches(text: str, products: list[dict]) -> None:
    reader = csv.reader(io.StringIO(text))
    header = next(reader)
    assert header == ["S. No.", "Product Name", "Input Image Urls", "Output Image Urls"]
    lines = list(reader)
    assert len(lines) == len(products)
    for line, product in zip(lines, products, strict=True):
        assert line[0] == product["serial_number"]
        assert line[1] == product["product_name"]
        assert line[2].split(",") == product["input_urls"]
        outputs = line[3].split(",")
        assert outputs == [url or "" for url in product["output_urls"]]


def test_bad_csv_is_refused_and_nothing_happens(settings: Settings) -> None:
    with running_system(settings) as system, httpx.Client(timeout=30) as client:
        upload = client.post(
            f"{system.ingest_url}/upload",
            files={"file": ("bad.csv", b"S. No.,Product Name\n1,Shoe\n", "text/csv")},
        )
        assert 400 <= upload.status_code < 500
        assert "Input Image Urls" in json.dumps(upload.json())
        # These tests allow private URLs (the images are on loopback): every service says so.
        for service in system.services.values():
            assert "IMGPIPE_ALLOW_PRIVATE_URLS is on" in service.log_path.read_text()
