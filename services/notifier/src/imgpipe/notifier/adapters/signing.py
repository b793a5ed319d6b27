"""Standard Webhooks signatures, through the reference `standardwebhooks` library."""

from __future__ import annotations

from datetime import datetime

from standardwebhooks.webhooks import Webhook


class Signer:
    def __init__(self, secret: str) -> None:
        self._webhook = Webhook(secret)  # raises on a secret that is not whsec_ + base64

    def headers(self, webhook_id: str, at: datetime, body: str) -> dict[str, str]:
        """`webhook-signature` is HMAC-SHA256 over `id.timestamp.body`, fresh for each attempt."""
        return {
            "webhook-id": webhook_id,
            "webhook-timestamp": str(int(at.timestamp())),
            "webhook-signature": self._webhook.sign(webhook_id, at, body),
        }
