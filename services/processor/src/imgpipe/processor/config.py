"""Processor-only settings (env `IMGPIPE_PROCESSOR_*`). What the processor shares with the
other services (workers, prefetch, download limits, ...) stays in the shared Settings."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ProcessorConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IMGPIPE_PROCESSOR_", extra="ignore")

    # How long shutdown waits for jobs in progress; the broker redelivers the rest.
    shutdown_grace: float = Field(default=20.0, ge=0)
    # Seconds between connection attempts while the broker is down.
    connect_retry: float = Field(default=2.0, gt=0)
