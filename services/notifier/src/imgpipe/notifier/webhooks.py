"""The webhook vocabulary: the webhook types, the order they go out in for one request,
and the states of a delivery."""

from __future__ import annotations

from typing import Final, Literal

RECEIVED: Final = "request.received"
PROCESSING: Final = "request.processing"
COMPLETED: Final = "request.completed"
ERROR: Final = "request.error"

WebhookType = Literal[
    "request.received", "request.processing", "request.completed", "request.error"
]
WEBHOOK_TYPES: tuple[WebhookType, ...] = (RECEIVED, PROCESSING, COMPLETED, ERROR)
FINAL_TYPES = frozenset({COMPLETED, ERROR})

# Deliveries to one endpoint for one request go out in this order.
SEQUENCE = {RECEIVED: 0, PROCESSING: 1, COMPLETED: 2, ERROR: 2}

# Delivery states. `pending` includes "in flight" (a live lease) and "waiting to retry".
PENDING: Final = "pending"
DELIVERED: Final = "delivered"
FAILED: Final = "failed"
CANCELLED: Final = "cancelled"
DONE_STATES = (DELIVERED, FAILED, CANCELLED)
DeliveryStatus = Literal["pending", "delivered", "failed", "cancelled"]
