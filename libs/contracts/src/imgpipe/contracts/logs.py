"""How every service logs: text lines by default (what `imgpipe up`'s console shows), or
one JSON object per line with IMGPIPE_LOG_FORMAT=json, for log pipelines.

A JSON line carries time, level, service, logger and message, and `request_id` whenever
the work in hand is one request's: the bus sets it for the event or job being handled
(`request_context`), ingest for the upload it stores. It carries `trace_id` whenever a
span is current (imgpipe.contracts.tracing), so a line leads to its request's trace."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from pythonjsonlogger.json import JsonFormatter

from imgpipe.contracts.tracing import current_trace_id

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_request_id: ContextVar[str | None] = ContextVar("imgpipe_request_id", default=None)


@contextmanager
def request_context(request_id: str) -> Iterator[None]:
    """Log lines emitted inside carry `request_id` (asyncio tasks inherit it)."""
    token = _request_id.set(request_id)
    try:
        yield
    finally:
        _request_id.reset(token)


class _RequestId(logging.Filter):
    """Adds the request in hand and the current trace to a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id") and (request_id := _request_id.get()):
            record.request_id = request_id
        if not hasattr(record, "trace_id") and (trace_id := current_trace_id()):
            record.trace_id = trace_id
        return True


def configure_logging(service: str, log_format: str) -> None:
    """Every log line of the process to stderr, in `log_format` ("text" or "json")."""
    handler = logging.StreamHandler()
    handler.addFilter(_RequestId())
    if log_format == "json":
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
                static_fields={"service": service},
            )
        )
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    # httpx logs every request at INFO: one line per image download and webhook is noise.
    logging.getLogger("httpx").setLevel(logging.WARNING)
