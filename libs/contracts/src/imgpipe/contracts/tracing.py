"""Traces (OpenTelemetry): one trace per request, from the upload to the last webhook.

Ingest starts the trace at `POST /upload` (or continues the caller's W3C `traceparent`),
every event carries it as the CloudEvents distributed tracing attribute `traceparent`,
the bus continues it in every consumer (and in the processor's private jobs, through a
`traceparent` message header), and the notifier sends it on every webhook POST.

Spans are exported over OTLP/HTTP only when OTEL_EXPORTER_OTLP_ENDPOINT (or
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is set: `configure_tracing` then installs the SDK
with a BatchSpanProcessor, configured by the standard OTEL_* variables. Otherwise
nothing is installed and the API's no-op tracer costs next to nothing; the trace is
still propagated, since a span started under a remote parent keeps its ids, and a root
gets random ids made here (`span`), so the 202's `trace_id` and the log lines' are real.

Span attributes stay low-risk: request ids, image keys, outcomes, error codes, byte
counts, and a URL's scheme and host only (`origin`), never credentials or full URLs.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

log = logging.getLogger(__name__)

TRACEPARENT = "traceparent"
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")

_propagator = TraceContextTextMapPropagator()
_tracer = trace.get_tracer("imgpipe")  # a proxy: follows the provider configure_tracing sets
_shutdown: list[object] = []  # the SDK provider this process installed, if any

Attributes = Mapping[str, AttributeValue]


def export_enabled(environ: Mapping[str, str] = os.environ) -> bool:
    return any(environ.get(name) for name in ENDPOINT_VARIABLES)


def configure_tracing(service: str) -> None:
    """Install the SDK for `imgpipe-<service>` when an OTLP endpoint is set; else nothing.

    The provider is process-global (OpenTelemetry allows one), so a process configures
    it once, at start-up, next to configure_logging."""
    if not export_enabled():
        return
    # Imported here: without an endpoint the SDK and exporter are never loaded.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: f"imgpipe-{service}"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _shutdown.append(provider)
    log.info("traces exported over OTLP as imgpipe-%s", service)


def shutdown_tracing() -> None:
    """Flush the spans still batched and stop the exporter (the service is stopping)."""
    while _shutdown:
        provider = _shutdown.pop()
        provider.shutdown()  # type: ignore[attr-defined]


@contextmanager
def span(
    name: str,
    *,
    parent: str | None = None,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Attributes | None = None,
) -> Iterator[Span]:
    """A span, current inside the block: a child of `parent` (a traceparent) when given
    and valid, else of the current span; a new trace when there is neither."""
    context = _context_of(parent) if parent else None
    started = _tracer.start_span(name, context=context, kind=kind, attributes=attributes)
    if not started.get_span_context().is_valid:
        # The no-op tracer with no parent: a root still needs ids to propagate.
        started = NonRecordingSpan(_new_root())
    with trace.use_span(started, end_on_exit=True, record_exception=True):
        yield started


def current_traceparent() -> str | None:
    """The current span as a W3C traceparent, None outside any span."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get(TRACEPARENT)


def current_trace_id() -> str | None:
    """The current trace id (32 hex digits), None outside any span."""
    context = trace.get_current_span().get_span_context()
    return trace.format_trace_id(context.trace_id) if context.is_valid else None


def trace_id_of(traceparent: str | None) -> str | None:
    """The trace id a traceparent names (32 hex digits), None if it is not a valid one."""
    if not traceparent:
        return None
    context = trace.get_current_span(_context_of(traceparent)).get_span_context()
    return trace.format_trace_id(context.trace_id) if context.is_valid else None


def origin(url: str) -> str:
    """A URL's scheme and host, the only part of a URL a span may carry."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError:
        return ""
    return f"{parts.scheme}://{host}" if host else ""


def _context_of(traceparent: str) -> Context:
    return _propagator.extract({TRACEPARENT: traceparent})


def _new_root() -> SpanContext:
    # The same generator the SDK uses (random.getrandbits); ids need no secrecy.
    return SpanContext(
        trace_id=random.getrandbits(128) or 1,
        span_id=random.getrandbits(64) or 1,
        is_remote=False,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )
