"""One trace per request, across every service, as real processes on the real broker and
database: the upload's trace is in the 202, every event, every webhook POST and the
status answer, and with an OTLP endpoint set every service's spans arrive under it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any

import httpx
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from imgpipe.contracts.events import RequestCompleted
from imgpipe.contracts.settings import Settings
from tests.support.http_server import LoopbackServer, Recorded, Response, loopback_server
from tests.support.images import jpeg_bytes
from tests.support.system import System, running_system
from tests.support.tap import EventTap, event_tap

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
# Four services importing at once on a busy 2-core machine can take over a minute.
READY = 240.0
SERVICES = {"imgpipe-ingest", "imgpipe-processor", "imgpipe-status", "imgpipe-notifier"}


def catalogue(server: LoopbackServer) -> tuple[str, str]:
    """A CSV of three images (one missing) and the webhook URL."""
    a = server.add("/img/a.jpg", Response(jpeg_bytes(320, 240, seed=1), content_type="image/jpeg"))
    b = server.add("/img/b.jpg", Response(jpeg_bytes(320, 240, seed=2), content_type="image/jpeg"))
    missing = server.url("/img/missing.jpg")
    server.add("/hooks", Response(b"ok", 200, "text/plain"))
    csv = f'S. No.,Product Name,Input Image Urls\n1,Shirt,"{a},{b}"\n2,Hat,{missing}\n'
    return csv, server.url("/hooks")


async def upload_and_finish(
    system: System, tap: EventTap, server: LoopbackServer, headers: dict[str, str]
) -> dict[str, Any]:
    """Upload, wait for RequestCompleted and the final webhook; the 202's body."""
    csv, hook = catalogue(server)
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.post(
            f"{system.ingest_url}/upload",
            files={"file": ("p.csv", csv.encode(), "text/csv")},
            data={"webhook_url": hook},
            headers=headers,
        )
        assert response.status_code == 202, response.text
        accepted: dict[str, Any] = response.json()
        await tap.until(accepted["request_id"], RequestCompleted)
        deadline = time.monotonic() + 60
        while len(server.requests_to("/hooks")) < 3:  # received, processing, final
            assert time.monotonic() < deadline, "the webhooks did not all arrive"
            await asyncio.sleep(0.1)
        status = await client.get(f"{system.status_url}/status/{accepted['request_id']}")
        assert status.status_code == 200
        assert status.json()["trace_id"] == accepted["trace_id"]
    await tap.flush()
    return accepted


def assert_one_trace(tap: EventTap, server: LoopbackServer, request_id: str, trace: str) -> None:
    events = [event for event in tap.events if event.data.request_id == request_id]
    assert len(events) == 1 + 3 + 1  # received, three images, completed
    assert {event.traceparent.split("-")[1] for event in events if event.traceparent} == {trace}
    assert all(event.traceparent for event in events)
    hooks: list[Recorded] = server.requests_to("/hooks")
    assert {hook.headers["traceparent"].split("-")[1] for hook in hooks} == {trace}


async def started(manager: AbstractContextManager[System]) -> System:
    """running_system entered off the event loop (it waits for the services, blocking)."""
    return await asyncio.to_thread(manager.__enter__)


async def stopped(manager: AbstractContextManager[System]) -> None:
    await asyncio.to_thread(manager.__exit__, None, None, None)


def spans_of(otlp: LoopbackServer) -> Iterator[tuple[str, str, str, dict[str, Any]]]:
    """(service.name, trace id, span name, attributes) of every span exported."""
    for request in otlp.requests_to("/v1/traces"):
        export = ExportTraceServiceRequest.FromString(request.body)
        for resource_spans in export.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    attributes = {a.key: _value(a.value) for a in span.attributes}
                    yield resource["service.name"], span.trace_id.hex(), span.name, attributes


def _value(value: Any) -> Any:
    return getattr(value, value.WhichOneof("value")) if value.WhichOneof("value") else None


async def test_every_service_exports_its_spans_under_the_callers_trace(
    settings: Settings,
) -> None:
    with loopback_server() as server, loopback_server() as otlp:
        otlp.add("/v1/traces", Response(b"", 200, "application/x-protobuf"))
        async with event_tap(settings) as tap:
            manager = running_system(
                settings,
                OTEL_EXPORTER_OTLP_ENDPOINT=otlp.base_url,
                OTEL_BSP_SCHEDULE_DELAY="200",  # ms: the spans go out while the test waits
                ready_timeout=READY,
            )
            system = await started(manager)
            try:
                accepted = await upload_and_finish(
                    system, tap, server, {"traceparent": TRACEPARENT}
                )
            finally:
                await stopped(manager)  # each service flushes its last spans as it stops
        assert accepted["trace_id"] == TRACE_ID
        assert_one_trace(tap, server, accepted["request_id"], TRACE_ID)

        everything = list(spans_of(otlp))
        spans = [span for span in everything if span[1] == TRACE_ID]
        assert {service for service, *_ in spans} == SERVICES
        # Other traces: health probes (FastAPI traces its routes itself) and status and
        # notifier hearing the tap's sentinel; no image or webhook span is outside.
        others = {name for _, trace, name, _ in everything if trace != TRACE_ID}
        assert not others & {"POST /upload", "process image", "download", "webhook POST"}
        names = {(service, name) for service, _, name, _ in spans}
        assert ("imgpipe-ingest", "POST /upload") in names
        for step in ("process image", "download", "compress", "store"):
            assert ("imgpipe-processor", step) in names
        assert ("imgpipe-notifier", "webhook POST") in names
        assert any(
            service == "imgpipe-status" and name.endswith("process")
            for service, _, name, _ in spans
        )
        images = [attrs for _, _, name, attrs in spans if name == "process image"]
        assert sorted(attrs["outcome"] for attrs in images) == ["failed", "ok", "ok"]
        assert {attrs["url.origin"] for attrs in images} == {"http://127.0.0.1"}  # no port, path
        # No secret and no full URL in any attribute.
        values = " ".join(str(value) for *_, attrs in spans for value in attrs.values())
        assert "/img/" not in values and "/hooks" not in values
        assert settings.resolved_webhook_secret not in values and "amqp://" not in values


async def test_without_an_endpoint_nothing_is_exported_and_the_trace_still_flows(
    settings: Settings,
) -> None:
    with loopback_server() as server:
        async with event_tap(settings) as tap:
            manager = running_system(
                settings,
                ready_timeout=READY,
                OTEL_EXPORTER_OTLP_ENDPOINT="",
                OTEL_EXPORTER_OTLP_TRACES_ENDPOINT="",
            )
            system = await started(manager)
            try:
                accepted = await upload_and_finish(system, tap, server, {})
            finally:
                await stopped(manager)
        assert len(accepted["trace_id"]) == 32 and int(accepted["trace_id"], 16)
        assert_one_trace(tap, server, accepted["request_id"], accepted["trace_id"])
        for service in system.services.values():
            assert "traces exported over OTLP" not in service.log_path.read_text()
