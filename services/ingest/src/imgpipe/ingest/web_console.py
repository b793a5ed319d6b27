"""The web console for merchandisers: `GET /` and its static files under `/console/`.

Plain HTML, CSS and JavaScript shipped in this package (no CDN, works offline). The
page calls ingest on its own origin and the status service on another one (CORS,
`IMGPIPE_CONSOLE_ORIGINS`); it learns where status is from `/console/config.json`.
Every answer carries a strict Content-Security-Policy: scripts and styles from here
only, API calls to here and to status, images from anywhere over http(s) (the
thumbnails show the catalogue's own image URLs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from fastapi import APIRouter
from fastapi.responses import FileResponse
from pydantic import BaseModel

from imgpipe.contracts.settings import Settings

STATIC = Path(__file__).parent / "console"
FILES: dict[str, tuple[str, str]] = {
    "console.js": ("console.js", "text/javascript; charset=utf-8"),
    "console.css": ("console.css", "text/css; charset=utf-8"),
}


class ConsoleConfig(BaseModel):
    status_base_url: str
    api_key_required: bool
    max_csv_bytes: int


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def security_headers(settings: Settings) -> dict[str, str]:
    policy = "; ".join(
        [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            f"connect-src 'self' {origin_of(settings.status_base_url)}",
            "img-src 'self' http: https:",
            "form-action 'none'",
            "base-uri 'none'",
            "frame-ancestors 'none'",
        ]
    )
    return {
        "Content-Security-Policy": policy,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "X-Frame-Options": "DENY",
        "Cache-Control": "no-cache",
    }


def console_router(settings: Settings) -> APIRouter:
    """Open like the docs: the page holds no data; it asks for the API key itself when
    IMGPIPE_API_KEYS is set, and every call it makes is guarded as usual."""
    router = APIRouter(tags=["console"], include_in_schema=False)
    headers = security_headers(settings)

    @router.get("/")
    async def index() -> FileResponse:
        return FileResponse(
            STATIC / "index.html", media_type="text/html; charset=utf-8", headers=headers
        )

    @router.get("/console/config.json", response_model=ConsoleConfig)
    async def config() -> ConsoleConfig:
        return ConsoleConfig(
            status_base_url=settings.status_base_url,
            api_key_required=bool(settings.api_keys),
            max_csv_bytes=settings.max_csv_bytes,
        )

    @router.get("/console/{name}")
    async def asset(name: Literal["console.js", "console.css"]) -> FileResponse:
        filename, media_type = FILES[name]
        return FileResponse(STATIC / filename, media_type=media_type, headers=headers)

    return router
