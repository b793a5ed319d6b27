"""Request and response bodies of the notifier's HTTP API."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any
from urllib.parse import SplitResult, urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from imgpipe.notifier.adapters.deliveries import DeliveryDoc
from imgpipe.notifier.adapters.subscriptions import SubscriptionDoc
from imgpipe.notifier.webhooks import WEBHOOK_TYPES, DeliveryStatus, WebhookType

MAX_PORT = 65535


class SubscriptionIn(BaseModel):
    # A misspelt field (say `event_type`) must not quietly subscribe to everything.
    model_config = ConfigDict(extra="forbid")

    url: str = Field(max_length=2048, examples=["https://example.com/hooks/imgpipe"])
    event_types: list[WebhookType] = Field(
        default_factory=lambda: list(WEBHOOK_TYPES),
        min_length=1,
        description="webhook types to receive; all of them when omitted",
    )

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        value = value.strip()
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an absolute http(s) URL")
        if not _valid_port(parts):
            raise ValueError(f"the port must be a number from 1 to {MAX_PORT}")
        return value

    @field_validator("event_types")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))


def _valid_port(parts: SplitResult) -> bool:
    """No port, or one a connection can use (urlsplit itself lets 0 through)."""
    try:
        port = parts.port  # raises for a port that is not a number or over 65535
    except ValueError:
        return False
    return port is None or 1 <= port <= MAX_PORT


class Subscription(BaseModel):
    id: str
    url: str
    event_types: list[WebhookType]
    created_at: datetime

    @classmethod
    def from_doc(cls, doc: SubscriptionDoc) -> Subscription:
        return cls(id=doc["_id"], **{k: doc[k] for k in ("url", "event_types", "created_at")})


class Attempt(BaseModel):
    at: datetime
    endpoint: str
    status_code: int | None
    latency_ms: float
    error: str | None
    outcome: str = Field(description="delivered, retry or failed")
    next_retry_at: datetime | None


class Delivery(BaseModel):
    id: str
    request_id: str
    event_type: WebhookType
    round: int = Field(0, description="0 for the first run, N for the Nth retry")
    endpoint: str
    subscription_id: str | None
    webhook_id: str = Field(description="the `webhook-id` header, the same on every retry")
    status: DeliveryStatus
    attempts: list[Attempt]
    next_attempt_at: datetime | None
    created_at: datetime
    updated_at: datetime
    delivered_at: datetime | None
    payload: dict[str, Any]

    @classmethod
    def from_doc(cls, doc: DeliveryDoc) -> Delivery:
        fields = {k: v for k, v in doc.items() if k in cls.model_fields}
        return cls(id=doc["_id"], payload=json.loads(doc["body"]), **fields)
