"""The processor's process: health routes over two consumers and an image worker pool."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from imgpipe.contracts.mongo import ping
from imgpipe.contracts.settings import Settings
from imgpipe.contracts.web import health_router
from imgpipe.processor.bootstrap import Runtime


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = await Runtime.start(settings)
        app.state.runtime = runtime
        try:
            yield
        finally:
            app.state.runtime = None
            await runtime.stop()

    async def checks() -> dict[str, bool]:
        runtime: Runtime | None = getattr(app.state, "runtime", None)
        return {
            "broker": runtime is not None and runtime.bus.is_connected,
            "database": runtime is not None and await ping(runtime.mongo),
        }

    app = FastAPI(
        title="imgpipe processor",
        summary="Downloads, compresses and stores images; health routes only.",
        lifespan=lifespan,
    )
    app.include_router(health_router(checks))
    return app
