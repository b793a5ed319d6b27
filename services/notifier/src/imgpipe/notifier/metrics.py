"""The notifier's own metrics (contracts.metrics has the shared ones and the rules)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from imgpipe.contracts.metrics import REGISTRY

WEBHOOK_ATTEMPTS = Counter(
    "imgpipe_webhook_attempts_total",
    "Webhook POSTs, by outcome: delivered, retry (to be tried again), failed (given up "
    "on) or cancelled.",
    ["outcome"],
    registry=REGISTRY,
)
WEBHOOK_SECONDS = Histogram(
    "imgpipe_webhook_duration_seconds",
    "One webhook POST, from sending to the receiver's answer (or the error).",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
