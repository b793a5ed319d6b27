"""Ingest's own settings: the outbox, its relay and its publishes (env `IMGPIPE_OUTBOX_*`);
the settings every service shares are `imgpipe.contracts.settings.Settings`."""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict


class OutboxConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IMGPIPE_OUTBOX_", extra="ignore")

    interval: float = 2.0  # seconds between relay passes
    grace: float = 5.0  # the upload itself publishes first; the relay waits this long
    lease: float = 30.0  # a relay's claim on a request, in case it dies mid-publish
    batch: int = 100  # requests per relay pass at most
    publish_timeout: float = 5.0  # an upload waits this long for the broker's confirm
    connect_retry: float = 2.0  # seconds between connection attempts while the broker is down
