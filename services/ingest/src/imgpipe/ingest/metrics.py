"""Ingest's own metrics (contracts.metrics has the shared ones and the rules)."""

from __future__ import annotations

from prometheus_client import Counter

from imgpipe.contracts.metrics import REGISTRY

REQUESTS_RECEIVED = Counter(
    "imgpipe_requests_received_total",
    "Uploads accepted (answered 202), each a request stored and to be published.",
    registry=REGISTRY,
)
IMAGES_RECEIVED = Counter(
    "imgpipe_images_received_total",
    "Image URLs in the uploads accepted.",
    registry=REGISTRY,
)
