"""configure_tracing: the SDK only when an OTLP endpoint is set; ids either way.

Each case runs in a fresh interpreter: OpenTelemetry's tracer provider is process-wide
and can be set only once."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from imgpipe.contracts.tracing import current_traceparent, origin, span, trace_id_of

PROBE = """
import json, sys
from opentelemetry import trace
from imgpipe.contracts.tracing import configure_tracing, current_trace_id, span
configure_tracing("status")
with span("probe"):
    trace_id = current_trace_id()
provider = trace.get_tracer_provider()
resource = getattr(provider, "resource", None)
print(json.dumps({
    "sdk": "opentelemetry.sdk.trace" in sys.modules,
    "service": resource.attributes.get("service.name") if resource else None,
    "trace_id": trace_id,
}))
"""


def probe(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    # Nothing listens there: the probe's one span is dropped quickly at exit.
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**clean, "OTEL_EXPORTER_OTLP_TIMEOUT": "1", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(done.stdout.splitlines()[-1])


def test_without_an_endpoint_the_sdk_is_not_even_loaded() -> None:
    seen = probe()
    assert seen["sdk"] is False and seen["service"] is None
    assert len(seen["trace_id"]) == 32  # a root still gets real ids


def test_with_an_endpoint_spans_are_exported_as_the_service() -> None:
    seen = probe(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT="http://127.0.0.1:9/v1/traces")
    assert seen["sdk"] is True and seen["service"] == "imgpipe-status"
    assert len(seen["trace_id"]) == 32


def test_a_span_continues_a_valid_traceparent_and_ignores_a_bad_one() -> None:
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    with span("child", parent=parent):
        assert trace_id_of(current_traceparent()) == "4bf92f3577b34da6a3ce929d0e0e4736"
    with span("root", parent="00-garbage"):
        fresh = trace_id_of(current_traceparent())
    assert fresh is not None and fresh != "4bf92f3577b34da6a3ce929d0e0e4736"
    assert current_traceparent() is None and trace_id_of("nonsense") is None


def test_a_span_may_name_a_url_s_origin_only() -> None:
    assert origin("https://user:secret@img.example.com:8443/a.jpg?sig=x") == (
        "https://img.example.com"
    )
    assert origin("not a url") == ""
