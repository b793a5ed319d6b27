"""Request and response bodies of the notifier's HTTP API."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, field_validator

from imgpipe.notifier.model import WEBHOOK_TYPES, WebhookType


class SubscriptionIn(BaseModel):
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
        return value

    @field_validator("event_types")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))


class Subscription(BaseModel):
    id: str
    url: str
    event_types: list[WebhookType]
    created_at: datetime

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Subscription:
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
    endpoint: str
    subscription_id: str | None
    webhook_id: str = Field(description="the `webhook-id` header, the same on every retry")
    status: str = Field(description="pending, delivered, failed or cancelled")
    attempts: list[Attempt]
    next_attempt_at: datetime | None
    created_at: datetime
    updated_at: datetime
    delivered_at: datetime | None
    payload: dict[str, Any]

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Delivery:
        fields = {k: v for k, v in doc.items() if k in cls.model_fields}
        return cls(id=doc["_id"], payload=json.loads(doc["body"]), **fields)
