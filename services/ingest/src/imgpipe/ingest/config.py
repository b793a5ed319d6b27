"""Ingest's own settings: the outbox, its relay and its publishes (env `IMGPIPE_OUTBOX_*`),
and how long finished requests are kept (env `IMGPIPE_RETENTION_*`); the settings every
service shares are `imgpipe.contracts.settings.Settings`."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class OutboxConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IMGPIPE_OUTBOX_", extra="ignore")

    interval: float = 2.0  # seconds between relay passes
    grace: float = 5.0  # the upload itself publishes first; the relay waits this long
    lease: float = 30.0  # a relay's claim on a request, in case it dies mid-publish
    batch: int = 100  # requests per relay pass at most
    publish_timeout: float = 5.0  # an upload waits this long for the broker's confirm
    connect_retry: float = 2.0  # seconds between connection attempts while the broker is down


class RetentionConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IMGPIPE_RETENTION_", extra="ignore")

    # Finished requests older than this many days are deleted; None keeps them for ever.
    days: float | None = Field(default=None, gt=0)
    interval: float = Field(default=600.0, gt=0)  # seconds between sweeps
