"""The processor's process: health routes over two consumers and an image worker pool."""

from __future__ import annotations

from fastapi import FastAPI

from imgpipe.contracts.service import service_app
from imgpipe.contracts.settings import Settings
from imgpipe.processor.bootstrap import Runtime
from imgpipe.processor.config import ProcessorConfig


def create_app(
    settings: Settings | None = None, *, config: ProcessorConfig | None = None
) -> FastAPI:
    settings = settings or Settings()
    config = config or ProcessorConfig()
    return service_app(
        title="imgpipe processor",
        summary="Downloads, compresses and stores images; health routes only.",
        start=lambda: Runtime.start(settings, config),
        metrics=settings.metrics,
    )
