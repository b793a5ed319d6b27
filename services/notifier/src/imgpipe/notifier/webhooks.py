"""The webhook vocabulary: the webhook types, the order they go out in for one request,
and the states of a delivery."""

from __future__ import annotations

from typing import Final, Literal

RECEIVED: Final = "request.received"
PROCESSING: Final = "request.processing"
COMPLETED: Final = "request.completed"
ERROR: Final = "request.error"
REQUEST_CANCELLED: Final = "request.cancelled"

WebhookType = Literal[
    "request.received",
    "request.processing",
    "request.completed",
    "request.error",
    "request.cancelled",
]
WEBHOOK_TYPES: tuple[WebhookType, ...] = (RECEIVED, PROCESSING, COMPLETED, ERROR, REQUEST_CANCELLED)
# How a run ends: one of these per round.
FINAL_TYPES = frozenset({COMPLETED, ERROR, REQUEST_CANCELLED})

# Deliveries to one endpoint for one request go out in this order, round after round:
# received (round 0 only), then per round processing and its final.
SEQUENCE = {RECEIVED: 0, PROCESSING: 1, COMPLETED: 2, ERROR: 2, REQUEST_CANCELLED: 2}
ROUND_STEP = 2  # a round's processing and final come after the previous round's


def sequence(event_type: str, round: int = 0) -> int:
    """A webhook's place among the request's: round N's come after round N-1's."""
    return SEQUENCE[event_type] + ROUND_STEP * round


def planned_key(event_type: str, round: int = 0) -> str:
    """How a request's `planned` list names a webhook of a round (round 0: just the type,
    as before retries existed)."""
    return f"{event_type}@r{round}" if round else event_type


# Delivery states. `pending` includes "in flight" (a live lease) and "waiting to retry".
PENDING: Final = "pending"
DELIVERED: Final = "delivered"
FAILED: Final = "failed"
CANCELLED: Final = "cancelled"
DONE_STATES = (DELIVERED, FAILED, CANCELLED)
DeliveryStatus = Literal["pending", "delivered", "failed", "cancelled"]
