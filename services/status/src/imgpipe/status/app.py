"""The status service: a read model built from events alone, and the API over it."""

from __future__ import annotations

import time
from pathlib import PurePosixPath

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from imgpipe.contracts.service import service_app
from imgpipe.contracts.settings import Settings
from imgpipe.status.bootstrap import Runtime
from imgpipe.status.config import ReadCacheConfig
from imgpipe.status.read_cache import Clock
from imgpipe.status.routes import requests_router, status_router


def create_app(
    settings: Settings | None = None,
    cache_config: ReadCacheConfig | None = None,
    clock: Clock = time.monotonic,
) -> FastAPI:
    """`cache_config` defaults to the environment (`IMGPIPE_STATUS_CACHE_*`); `clock`
    drives the read cache's expiry (tests step it by hand)."""
    settings = settings or Settings()
    cache_config = cache_config or ReadCacheConfig()
    app = service_app(
        title="imgpipe status",
        summary="Request status, output CSV and local media, from events alone.",
        start=lambda: Runtime.start(settings, cache_config, clock),
        metrics=settings.metrics,
        routers=[status_router(settings), requests_router(settings)],
    )
    # Media is public on purpose: its URLs are handed out in status answers and webhooks.
    settings.media_dir.mkdir(parents=True, exist_ok=True)
    app.mount("/media", MediaFiles(directory=settings.media_dir, check_dir=False), name="media")
    # The web console (ingest's `GET /`) reads status from its own origin: let it, and
    # only it, with the API key in Authorization. Nothing here uses cookies.
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.console_origins,
        allow_methods=["GET"],
        allow_headers=["Authorization"],
        expose_headers=["ETag", "X-Imgpipe-Status"],
        max_age=600,
    )
    return app


# The processor's output formats, by extension: Python's own table knows AVIF only from
# 3.13 on (or from the machine's /etc/mime.types, which slim images lack).
MEDIA_TYPES = {".jpg": "image/jpeg", ".webp": "image/webp", ".avif": "image/avif"}


class MediaFiles(StaticFiles):
    """The compressed images: shared ones under `objects/` (named by a hash of their input
    and options), older ones under `<request_id>/`. A file never changes once written (a
    name stands for one input encoded one way), so caches may keep it; `nosniff` holds
    browsers to the served type."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)  # raises for a missing file
        media_type = MEDIA_TYPES.get(PurePosixPath(path).suffix.lower())
        if media_type is not None:
            response.headers["Content-Type"] = media_type
        response.headers["Cache-Control"] = "public, max-age=86400"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response
