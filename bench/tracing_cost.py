"""What tracing costs per image, in µs of CPU on the event loop.

Per image the services make, in the request's trace: the processor's consumer span
for its job (counted whole, though a job holds up to 8 images), the image span with its
download, compress and store spans, the traceparent named for its ImageProcessed, and
the consumer spans status and notifier open for that event (each from its traceparent).

Three ways, each in a fresh interpreter (the tracer provider is process-wide):

- off: no OTLP endpoint, what a service runs by default (the API's no-op tracer);
- sdk, no processor: the SDK installed with nothing to export to, for comparison;
- export: the SDK with a BatchSpanProcessor, as with OTEL_EXPORTER_OTLP_ENDPOINT, its
  exporter a sink (the network send happens on the processor's own thread).

    .venv/bin/python bench/tracing_cost.py [images]
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence

MODES = ("off", "sdk, no processor", "export")
PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def install(mode: str) -> None:
    if mode == "off":
        return
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    class Sink(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider(resource=Resource.create({"service.name": "imgpipe-bench"}))
    if mode == "export":
        provider.add_span_processor(BatchSpanProcessor(Sink(), max_queue_size=1 << 16))
    trace.set_tracer_provider(provider)


def one_image(key: str) -> None:
    from imgpipe.contracts.tracing import current_traceparent, origin, span

    with span("processor.jobs process", parent=PARENT):
        attributes = {"request_id": "r", "image_key": key, "url.origin": origin("https://h/x")}
        with span("process image", attributes=attributes) as image:
            with span("download") as download:
                download.set_attributes({"bytes": 123_456, "attempts": 1})
            with span("compress") as compress:
                compress.set_attributes({"bytes_out": 45_678, "format": "jpeg"})
            with span("store") as store:
                store.set_attribute("bytes", 45_678)
            image.set_attributes({"outcome": "ok", "bytes_in": 123_456, "bytes_out": 45_678})
            traceparent = current_traceparent()
    for _consumer in ("status", "notifier"):
        with span("events process", parent=traceparent, attributes={"request_id": "r"}):
            pass


def measure(mode: str, images: int) -> float:
    install(mode)
    for index in range(min(images, 2000)):  # warm up
        one_image(str(index))
    started = time.process_time()
    for index in range(images):
        one_image(str(index))
    return (time.process_time() - started) / images * 1e6


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--mode":
        print(f"{measure(sys.argv[2], int(sys.argv[3])):.1f}")
        return
    images = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    print(f"tracing overhead per image ({images:,} images, 7 spans each)")
    for mode in MODES:
        run = [sys.executable, __file__, "--mode", mode, str(images)]
        micros = subprocess.run(run, capture_output=True, text=True, check=True).stdout.strip()
        print(f"  {mode:<18} {micros:>7} µs/image")


if __name__ == "__main__":
    main()
