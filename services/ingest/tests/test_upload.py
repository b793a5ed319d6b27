"""POST /upload against the real broker and database."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from pymongo.asynchronous.database import AsyncDatabase

from imgpipe.contracts.events import Options, RequestReceived
from imgpipe.contracts.settings import Settings

HEADER = "S. No.,Product Name,Input Image Urls\n"
VALID = HEADER + "1,Shirt,https://img.example.com/a.jpg\n"


def upload_form(content: bytes | str, **fields: Any) -> dict[str, Any]:
    body = content.encode() if isinstance(content, str) else content
    data = {key: str(value) for key, value in fields.items()}
    return {"files": {"file": ("products.csv", body, "text/csv")}, "data": data}


async def test_valid_csv_is_stored_and_published(
    settings: Settings, run_ingest, received_events, ingest_db: AsyncDatabase
) -> None:
    csv = (
        "\ufeff  s. NO. ,product name,INPUT IMAGE URLS ,Notes\r\n"
        '1,"Blue Shirt","https://img.example.com/a.jpg, https://img.example.com/b.png"\r\n'
        "\r\n"
        "2,Red Hat,http://img.example.com/c.jpg,ignored extra column\r\n"
    )
    async with run_ingest(settings) as (_, client):
        response = await client.post(
            "/upload",
            **upload_form(csv.encode(), webhook_url="http://hooks.example.com/x", quality=70),
        )
    assert response.status_code == 202, response.text
    body = response.json()
    request_id = body["request_id"]
    assert len(request_id) >= 32
    assert body["status"] == "received"
    assert body["status_url"] == f"http://127.0.0.1:8002/status/{request_id}"

    event = await received_events.next()
    assert isinstance(event.data, RequestReceived)
    assert event.id == f"{request_id}:received"
    assert event.source == "imgpipe.ingest"
    assert event.subject == request_id
    assert event.type == "io.imgpipe.request.received.v1"
    assert [row.model_dump() for row in event.data.rows] == [
        {
            "serial_number": "1",
            "product_name": "Blue Shirt",
            "input_urls": ["https://img.example.com/a.jpg", "https://img.example.com/b.png"],
        },
        {
            "serial_number": "2",
            "product_name": "Red Hat",
            "input_urls": ["http://img.example.com/c.jpg"],
        },
    ]
    assert event.data.image_count == 3
    assert event.data.options.quality == 70
    assert event.data.webhook_url == "http://hooks.example.com/x"

    stored = await ingest_db.requests.find_one({"_id": request_id})
    assert stored is not None
    assert [row["serial_number"] for row in stored["rows"]] == ["1", "2"]
    assert stored["options"]["quality"] == 70
    assert stored["webhook_url"] == "http://hooks.example.com/x"
    assert stored["published_at"] is not None


async def test_defaults_without_webhook_or_quality(
    settings: Settings, run_ingest, received_events
) -> None:
    async with run_ingest(settings) as (_, client):
        response = await client.post("/upload", **upload_form(VALID))
    assert response.status_code == 202
    event = await received_events.next()
    assert event.data.options == Options()
    assert event.data.options.format == "auto" and event.data.options.max_side is None
    assert event.data.webhook_url is None


async def test_output_options_are_carried_in_the_event(
    settings: Settings, run_ingest, received_events
) -> None:
    fields = {"quality": 80, "format": "avif", "max_side": 800, "progressive": "true"}
    async with run_ingest(settings) as (_, client):
        response = await client.post("/upload", **upload_form(VALID, **fields))
    assert response.status_code == 202, response.text
    event = await received_events.next()
    assert event.data.options == Options(quality=80, format="avif", max_side=800, progressive=True)
    assert event.data.refresh is False


async def test_refresh_is_carried_in_the_event(
    settings: Settings, run_ingest, received_events
) -> None:
    async with run_ingest(settings) as (_, client):
        response = await client.post("/upload", **upload_form(VALID, refresh="true"))
    assert response.status_code == 202, response.text
    event = await received_events.next()
    assert event.data.refresh is True and event.data.options == Options()


BAD_CSVS = [
    pytest.param(
        b"S. No.,Product Name\n1,Shirt\n",
        1,
        "Input Image Urls",
        "missing column",
        id="missing-column",
    ),
    pytest.param(
        (VALID + "2,,https://img.example.com/b.jpg\n").encode(),
        3,
        "Product Name",
        "product name is empty",
        id="empty-product-name",
    ),
    pytest.param(
        (HEADER + " ,Shirt,https://img.example.com/a.jpg\n").encode(),
        2,
        "S. No.",
        "serial number is empty",
        id="empty-serial",
    ),
    pytest.param(
        (HEADER + '1,Shirt," , ,"\n').encode(), 2, "Input Image Urls", "no image URLs", id="no-urls"
    ),
    pytest.param(
        (HEADER + "1,Shirt,ftp://img.example.com/a.jpg\n").encode(),
        2,
        "Input Image Urls",
        "http:// or https://",
        id="non-http-url",
    ),
    pytest.param(
        (HEADER + "1,Shirt,not-a-url\n").encode(),
        2,
        "Input Image Urls",
        "http:// or https://",
        id="not-a-url",
    ),
    pytest.param(
        (HEADER + "1,Shirt,https:///no-host.jpg\n").encode(),
        2,
        "Input Image Urls",
        "no host",
        id="url-without-host",
    ),
    pytest.param(
        (HEADER + "1,Shirt,https://img.example.com:99999/a.jpg\n").encode(),
        2,
        "Input Image Urls",
        "not a valid URL",
        id="url-bad-port",
    ),
    pytest.param(
        (HEADER + "1,Shirt,https://user:secret@img.example.com/a.jpg\n").encode(),
        2,
        "Input Image Urls",
        "credentials",
        id="url-with-credentials",
    ),
    pytest.param(
        (
            VALID + "2,Hat,https://img.example.com/b.jpg\n1,Cap,https://img.example.com/c.jpg\n"
        ).encode(),
        4,
        "S. No.",
        "duplicate serial number '1' (first on line 2)",
        id="duplicate-serial",
    ),
    pytest.param(
        # Line 2's quoted name spans two physical lines, so the bad row starts on line 4.
        (
            HEADER + '1,"Shirt\nlong",https://img.example.com/a.jpg\n2,Hat,javascript:alert(1)\n'
        ).encode(),
        4,
        "Input Image Urls",
        "http:// or https://",
        id="line-numbers-count-physical-lines",
    ),
    pytest.param(
        VALID.encode() + b"2,Caf\xe9,https://img.example.com/b.jpg\n",
        3,
        None,
        "not UTF-8",
        id="latin-1",
    ),
    pytest.param(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", 3, None, "not a CSV", id="binary"),
    pytest.param(b"", 1, None, "empty", id="empty-file"),
    pytest.param(b"hello, world\n", 1, "S. No.", "missing column", id="no-header"),
    pytest.param(HEADER.encode(), 2, None, "no product rows", id="header-only"),
    pytest.param(
        (HEADER + '1,"Shirt,https://img.example.com/a.jpg\n').encode(),
        2,
        None,
        "not a valid CSV row",
        id="unterminated-quote",
    ),
]


@pytest.mark.parametrize(("content", "line", "column", "message"), BAD_CSVS)
async def test_bad_csv_is_refused_with_its_line(
    settings: Settings,
    run_ingest,
    received_events,
    ingest_db: AsyncDatabase,
    content: bytes,
    line: int,
    column: str | None,
    message: str,
) -> None:
    async with run_ingest(settings) as (_, client):
        refused = await client.post("/upload", **upload_form(content))
        assert refused.status_code == 422, refused.text
        body = refused.json()
        assert body["detail"].startswith("CSV has")
        assert any(
            error["line"] == line and error["column"] == column and message in error["message"]
            for error in body["errors"]
        ), body
        assert await ingest_db.requests.count_documents({}) == 0

        # Nothing went out for the refused file: the next event is the next good upload's.
        accepted = await client.post("/upload", **upload_form(VALID))
    assert (await received_events.next()).data.request_id == accepted.json()["request_id"]


async def test_every_problem_is_listed(settings: Settings, run_ingest) -> None:
    csv = (
        HEADER
        + "1,Shirt,https://img.example.com/a.jpg\n"
        + "1,,https://img.example.com/b.jpg\n"  # duplicate serial and empty name
        + "3,Hat,ftp://img.example.com/c.jpg\n"
    )
    async with run_ingest(settings) as (_, client):
        response = await client.post("/upload", **upload_form(csv, webhook_url="mailto:x@y"))
    assert response.status_code == 422
    body = response.json()
    assert body["detail"] == "CSV has 4 problems"
    assert [(error["line"], error["column"], error["field"]) for error in body["errors"]] == [
        (None, None, "webhook_url"),
        (3, "S. No.", None),
        (3, "Product Name", None),
        (4, "Input Image Urls", None),
    ]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"webhook_url": "ftp://hooks.example.com/x"}, "webhook_url"),
        ({"webhook_url": "https://user:pw@hooks.example.com/x"}, "webhook_url"),
        ({"quality": 0}, "quality"),
        ({"quality": 96}, "quality"),
        ({"quality": "high"}, "quality"),
        ({"format": "png"}, "format"),
        ({"max_side": 0}, "max_side"),
        ({"max_side": 16_384}, "max_side"),
        ({"max_side": "big"}, "max_side"),
        ({"progressive": "maybe"}, "progressive"),
    ],
)
async def test_bad_form_field_is_refused(
    settings: Settings, run_ingest, ingest_db: AsyncDatabase, fields: dict, field: str
) -> None:
    async with run_ingest(settings) as (_, client):
        response = await client.post("/upload", **upload_form(VALID, **fields))
    assert response.status_code == 422, response.text
    assert [error["field"] for error in response.json()["errors"]] == [field]
    assert await ingest_db.requests.count_documents({}) == 0


async def test_missing_file_is_refused(settings: Settings, run_ingest) -> None:
    async with run_ingest(settings) as (_, client):
        response = await client.post("/upload", data={"quality": "50"})
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "file"


def rows_csv(rows: int, urls_per_row: int = 1) -> str:
    lines = [HEADER]
    for number in range(1, rows + 1):
        urls = ", ".join(f"https://img.example.com/{number}/{i}.jpg" for i in range(urls_per_row))
        lines.append(f'{number},Product {number},"{urls}"\n')
    return "".join(lines)


@pytest.mark.parametrize(
    ("limits", "csv", "line"),
    [
        ({"max_csv_bytes": 200}, rows_csv(20), None),  # caught while reading the file
        ({"max_csv_bytes": 200}, rows_csv(3000), None),  # body over the route's own limit
        ({"max_rows": 2}, rows_csv(3), 4),
        ({"max_images": 3}, rows_csv(2, urls_per_row=2), 3),
    ],
    ids=["bytes", "bytes-body", "rows", "images"],
)
async def test_limits_answer_413(
    settings: Settings,
    run_ingest,
    ingest_db: AsyncDatabase,
    limits: dict,
    csv: str,
    line: int | None,
) -> None:
    async with run_ingest(settings.model_copy(update=limits)) as (_, client):
        response = await client.post("/upload", **upload_form(csv))
    assert response.status_code == 413, response.text
    errors = response.json()["errors"]
    assert errors[-1]["line"] == line
    assert "more than" in errors[-1]["message"] or "larger than" in errors[-1]["message"]
    assert await ingest_db.requests.count_documents({}) == 0


async def test_a_request_too_big_for_the_broker_answers_413(
    settings: Settings, run_ingest, ingest_db: AsyncDatabase, received_events
) -> None:
    """Within the CSV limits, yet larger as a RequestReceived than the broker takes: refused
    at once, rather than stored and left in the outbox for ever."""
    csv = rows_csv(40, urls_per_row=2)
    async with run_ingest(settings.model_copy(update={"max_event_bytes": 4_000})) as (_, client):
        refused = await client.post("/upload", **upload_form(csv))
        accepted = await client.post("/upload", **upload_form(rows_csv(2)))
    assert refused.status_code == 413, refused.text
    [error] = refused.json()["errors"]
    assert error["field"] == "file"
    assert "as an event, over the limit of 4,000" in error["message"]
    assert accepted.status_code == 202, accepted.text
    assert await ingest_db.requests.count_documents({}) == 1
    event = await received_events.next()
    assert event.data.request_id == accepted.json()["request_id"]


async def test_thousand_rows(settings: Settings, run_ingest, received_events) -> None:
    async with run_ingest(settings) as (_, client):
        response = await client.post("/upload", **upload_form(rows_csv(1000, urls_per_row=2)))
    assert response.status_code == 202, response.text
    event = await received_events.next()
    assert len(event.data.rows) == 1000
    assert event.data.image_count == 2000
    assert event.data.rows[-1].input_urls[-1] == "https://img.example.com/1000/1.jpg"


async def test_api_key_required_when_configured(settings: Settings, run_ingest) -> None:
    async with run_ingest(settings.model_copy(update={"api_keys": ["s3cret"]})) as (_, client):
        without = await client.post("/upload", **upload_form(VALID))
        wrong = await client.post(
            "/upload", headers={"Authorization": "Bearer nope"}, **upload_form(VALID)
        )
        right = await client.post(
            "/upload", headers={"Authorization": "Bearer s3cret"}, **upload_form(VALID)
        )
        health = await client.get("/healthz")
    assert (without.status_code, wrong.status_code, right.status_code) == (401, 401, 202)
    assert health.status_code == 200


async def test_health_and_docs(settings: Settings, run_ingest) -> None:
    async with run_ingest(settings) as (_, client):
        ready = await client.get("/readyz")
        docs = await client.get("/docs")
        schema = (await client.get("/openapi.json")).json()
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"broker": True, "database": True}
    assert docs.status_code == 200
    assert "/upload" in schema["paths"]


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_database_down_answers_503_and_publishes_nothing(
    settings: Settings, run_ingest, received_events
) -> None:
    no_db = settings.model_copy(update={"mongodb_url": f"mongodb://127.0.0.1:{unused_port()}"})
    async with run_ingest(no_db) as (_, client):
        response = await client.post("/upload", **upload_form(VALID))
    assert response.status_code == 503
    assert "database unavailable" in response.json()["detail"]

    async with run_ingest(settings) as (_, client):
        accepted = await client.post("/upload", **upload_form(VALID))
    assert (await received_events.next()).data.request_id == accepted.json()["request_id"]


async def test_ten_thousand_rows(settings: Settings, run_ingest, received_events) -> None:
    async with run_ingest(settings) as (_, client):
        response = await client.post("/upload", **upload_form(rows_csv(10_000, urls_per_row=3)))
    assert response.status_code == 202, response.text
    event = await received_events.next()
    assert len(event.data.rows) == 10_000
    assert event.data.image_count == 30_000


async def test_private_addresses_are_refused_at_upload(
    settings: Settings, run_ingest, ingest_db: AsyncDatabase
) -> None:
    """With IMGPIPE_ALLOW_PRIVATE_URLS off, the outbound guard's static rules apply here too."""
    strict = settings.model_copy(update={"allow_private_urls": False})
    csv = (
        HEADER
        + "1,Shirt,https://img.example.com/a.jpg\n"
        + "2,Metadata,http://169.254.169.254/latest/meta-data/\n"
        + '3,Loopback,"https://img.example.com/b.jpg,http://2130706433/x.jpg"\n'
    )
    async with run_ingest(strict) as (_, client):
        response = await client.post(
            "/upload", **upload_form(csv, webhook_url="http://[::1]:8080/hook")
        )
    assert response.status_code == 422, response.text
    errors = response.json()["errors"]
    assert [(error["line"], error["field"]) for error in errors] == [
        (None, "webhook_url"),
        (3, None),
        (4, None),
    ]
    assert all("refused" in error["message"] for error in errors)
    assert await ingest_db.requests.count_documents({}) == 0


TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


async def test_the_upload_continues_the_callers_trace(
    settings: Settings, run_ingest, received_events, ingest_db: AsyncDatabase
) -> None:
    async with run_ingest(settings) as (_, client):
        response = await client.post(
            "/upload", headers={"traceparent": TRACEPARENT}, **upload_form(VALID)
        )
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    event = await received_events.next()
    assert event.traceparent is not None
    assert event.traceparent.split("-")[1] == body["trace_id"]
    stored = await ingest_db.requests.find_one({"_id": body["request_id"]})
    assert stored is not None and stored["traceparent"] == event.traceparent  # for the relay


async def test_an_upload_without_a_trace_starts_one(
    settings: Settings, run_ingest, received_events
) -> None:
    async with run_ingest(settings) as (_, client):
        first = (await client.post("/upload", **upload_form(VALID))).json()
        second = (
            await client.post(
                "/upload", headers={"traceparent": "00-not-a-trace"}, **upload_form(VALID)
            )
        ).json()
    assert len(first["trace_id"]) == 32 and int(first["trace_id"], 16)
    assert len(second["trace_id"]) == 32 and second["trace_id"] != first["trace_id"]
    events = [await received_events.next(), await received_events.next()]
    assert {event.traceparent.split("-")[1] for event in events if event.traceparent} == {
        first["trace_id"],
        second["trace_id"],
    }
