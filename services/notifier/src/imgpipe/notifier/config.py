"""Notifier-only tuning knobs; the shared Settings hold the secret and the retry schedule."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class NotifierConfig(BaseSettings):
    """Read from `WEBHOOK_*` environment variables (e.g. WEBHOOK_TIMEOUT=10)."""

    model_config = SettingsConfigDict(env_prefix="WEBHOOK_", env_file=".env", extra="ignore")

    # Whole-attempt limit: connect, send, wait for the answer.
    timeout: float = Field(default=10.0, gt=0)
    # How often the dispatcher looks for due deliveries when nothing woke it up.
    poll_interval: float = Field(default=1.0, gt=0)
    # Attempts in flight at once in this process, and per endpoint, so one dead
    # endpoint cannot take every slot.
    concurrency: int = Field(default=64, ge=1)
    per_endpoint_concurrency: int = Field(default=8, ge=1)
    # A claimed delivery is left alone by other instances this long past the timeout.
    lease_margin: float = Field(default=30.0, ge=0)
    # A RequestCompleted may overtake some ImageProcessed events; the final webhook
    # waits this long for them so its product list is whole, then goes anyway.
    completion_grace: float = Field(default=30.0, ge=0)
    # Requests with more images than this get no `products` in the final webhook but
    # `products_omitted: true` (the output CSV URL and the status pages have them all):
    # a webhook stays small (a 1,000-image request's products are ~150 KB of JSON) and
    # building it never loads every outcome of a large request.
    max_products_images: int = Field(default=1_000, ge=0)
    # An ImageProcessed waits this long for others to share its write (contracts.batching):
    # a processing webhook goes out this much later, SecantusDB does far fewer round trips.
    image_batch_window: float = Field(default=0.2, ge=0)

    @property
    def lease(self) -> float:
        return self.timeout + self.lease_margin
