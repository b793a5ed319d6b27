"""The notifier's FastAPI app: its API over the Runtime (bootstrap.py) that consumes events,
plans webhooks and runs the dispatcher."""

from __future__ import annotations

from fastapi import FastAPI

from imgpipe.contracts.service import service_app
from imgpipe.contracts.settings import Settings
from imgpipe.notifier.bootstrap import Runtime
from imgpipe.notifier.config import NotifierConfig
from imgpipe.notifier.routes import notifier_router


def create_app(settings: Settings | None = None, config: NotifierConfig | None = None) -> FastAPI:
    settings = settings or Settings()
    config = config or NotifierConfig()
    return service_app(
        title="imgpipe notifier",
        summary="Signed, retried webhooks (Standard Webhooks) for request status changes.",
        start=lambda: Runtime.start(settings, config),
        metrics=settings.metrics,
        routers=[notifier_router(settings)],
    )
