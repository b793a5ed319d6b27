"""HTTP pieces every service shares: health routes and API-key auth."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, HTTPException, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel

from imgpipe.contracts.logs import configure_logging
from imgpipe.contracts.settings import Settings
from imgpipe.contracts.tracing import configure_tracing, shutdown_tracing


class Health(BaseModel):
    status: str
    checks: dict[str, bool] = {}


def health_router(checks: Callable[[], Awaitable[dict[str, bool]]]) -> APIRouter:
    """`/healthz` answers while the process runs; `/readyz` only when every check passes."""
    router = APIRouter(tags=["health"])

    @router.get("/healthz", response_model=Health)
    async def healthz() -> Health:
        return Health(status="ok")

    @router.get("/readyz", response_model=Health, responses={503: {"model": Health}})
    async def readyz() -> Health:
        results = await checks()
        if not all(results.values()):
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail=results)
        return Health(status="ok", checks=results)

    return router


_bearer = HTTPBearer(auto_error=False)


def require_api_key(settings: Settings) -> Callable[..., Awaitable[None]]:
    """A dependency that wants `Authorization: Bearer KEY` when IMGPIPE_API_KEYS is set."""

    async def dependency(
        credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
    ) -> None:
        if not settings.api_keys:
            return
        given = credentials.credentials.encode() if credentials else b""
        # Check every key so timing does not reveal which one came close.
        matched = False
        for key in settings.api_keys:
            matched |= hmac.compare_digest(given, key.encode())
        if not matched:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                detail="missing or invalid API key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return dependency


def serve(create_app: Callable[[Settings], FastAPI], port: Callable[[Settings], int]) -> None:
    """Run one service with uvicorn: every service's `main` is this one call."""
    settings = Settings()
    # "imgpipe.<service>.app" -> "<service>"
    service = create_app.__module__.split(".")[1]
    configure_logging(service, settings.log_format)
    configure_tracing(service)
    if settings.allow_private_urls:
        logging.getLogger("imgpipe").warning(
            "IMGPIPE_ALLOW_PRIVATE_URLS is on: image and webhook URLs may reach loopback and "
            "private networks (for tests and demos only; never expose this instance)"
        )
    # log_config=None: uvicorn's loggers use the same format as the service's own.
    try:
        uvicorn.run(create_app(settings), host=settings.host, port=port(settings), log_config=None)
    finally:
        shutdown_tracing()  # after the app stopped: its last spans go out too
