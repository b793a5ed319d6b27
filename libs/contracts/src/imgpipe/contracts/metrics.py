"""Prometheus metrics every service exposes on `GET /metrics` (docs/architecture.md,
"Observability").

Names start with `imgpipe_` and carry their unit; labels are bounded sets (an event
type, a queue, an outcome), never a request id, a URL or a host name. Two registries
make one exposition:

- `REGISTRY`, one per process: what the process does whatever app serves it (events
  published and consumed, handler failures, dead letters, CPU and memory), and the
  service's own metrics, declared in the service with `registry=REGISTRY`;
- one per app for its HTTP requests (prometheus-fastapi-instrumentator), since a test
  process builds many apps and a registry refuses the same metric twice.

Each process answers for itself: the processor's image workers report nothing (the
processor's main process does their bookkeeping), and N processor instances are N
targets for Prometheus to scrape and sum.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    ProcessCollector,
    generate_latest,
)
from prometheus_fastapi_instrumentator import Instrumentator

REGISTRY = CollectorRegistry()
ProcessCollector(namespace="imgpipe", registry=REGISTRY)

EVENTS_PUBLISHED = Counter(
    "imgpipe_events_published_total",
    "Events published to the events exchange and confirmed by the broker, by type.",
    ["type"],
    registry=REGISTRY,
)
EVENTS_CONSUMED = Counter(
    "imgpipe_events_consumed_total",
    "Events a consumer handled and acknowledged, by queue and type.",
    ["queue", "type"],
    registry=REGISTRY,
)
HANDLER_FAILURES = Counter(
    "imgpipe_handler_failures_total",
    "Messages whose handler failed and which went back to their queue, by queue.",
    ["queue"],
    registry=REGISTRY,
)
DEAD_LETTERED = Counter(
    "imgpipe_messages_dead_lettered_total",
    "Messages refused for good (unparseable), sent to the dead-letter queue, by queue.",
    ["queue"],
    registry=REGISTRY,
)


def instrument(app: FastAPI) -> None:
    """HTTP metrics for `app` (`imgpipe_http_requests_total`, request durations) and the
    `GET /metrics` route, which answers without an API key, like the health routes."""
    http = CollectorRegistry()
    Instrumentator(
        registry=http,
        excluded_handlers=["/metrics", "/healthz", "/readyz"],
        should_group_status_codes=True,
    ).instrument(app, metric_namespace="imgpipe")
    router = APIRouter(tags=["health"])

    @router.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        body = generate_latest(REGISTRY) + generate_latest(http)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    app.include_router(router)
