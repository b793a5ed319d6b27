"""The ingest service's app: `POST /upload` over the Runtime, with its error handlers and
the upload-size limit."""

from __future__ import annotations

import inspect
import logging
from dataclasses import asdict
from typing import cast

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imgpipe.contracts.service import service_app
from imgpipe.contracts.settings import Settings
from imgpipe.ingest.bootstrap import Runtime
from imgpipe.ingest.config import OutboxConfig, RetentionConfig
from imgpipe.ingest.domain import (
    Conflict,
    IdempotencyConflict,
    PublishFailed,
    StoreUnavailable,
    UnknownRequest,
    UploadRejected,
)
from imgpipe.ingest.routes import requests_router, upload_router
from imgpipe.ingest.schemas import ErrorOut, ProblemOut, ProblemReport
from imgpipe.ingest.web_console import console_router

log = logging.getLogger(__name__)

# Multipart framing and the small form fields, on top of the CSV itself.
FORM_OVERHEAD_BYTES = 64 * 1024


def create_app(
    settings: Settings | None = None,
    *,
    outbox: OutboxConfig | None = None,
    retention: RetentionConfig | None = None,
) -> FastAPI:
    settings = settings or Settings()
    outbox = outbox or OutboxConfig()
    retention = retention or RetentionConfig()
    app = service_app(
        title="imgpipe ingest",
        summary="Takes a CSV of product image URLs and starts processing it, and takes "
        "commands on submitted requests: cancel, retry, delete.",
        start=lambda: Runtime.start(settings, outbox, retention),
        metrics=settings.metrics,
        routers=[
            upload_router(settings, outbox),
            requests_router(settings),
            console_router(settings),
        ],
    )
    _add_error_handlers(app, settings)
    app.add_middleware(
        UploadSizeLimit, path="/upload", max_bytes=settings.max_csv_bytes + FORM_OVERHEAD_BYTES
    )
    return app


def _add_error_handlers(app: FastAPI, settings: Settings) -> None:
    """Every refusal answers `{"detail", "errors": [...]}`, each error naming its line,
    column or form field."""

    @app.exception_handler(UploadRejected)
    async def rejected(_: Request, exc: UploadRejected) -> JSONResponse:
        errors = [ProblemOut(**asdict(problem)) for problem in exc.problems]
        return _report(exc.status_code, exc.detail, errors)

    @app.exception_handler(StoreUnavailable)
    async def store_down(_: Request, exc: StoreUnavailable) -> JSONResponse:
        log.error("upload refused, database unavailable: %s", exc)
        body = ErrorOut(detail="database unavailable: nothing was stored, try again later")
        return JSONResponse(body.model_dump(), status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(UnknownRequest)
    async def unknown(_: Request, exc: UnknownRequest) -> JSONResponse:
        return JSONResponse(ErrorOut(detail="no such request").model_dump(), status_code=404)

    @app.exception_handler(Conflict)
    async def conflict(_: Request, exc: Conflict) -> JSONResponse:
        return JSONResponse(ErrorOut(detail=str(exc)).model_dump(), status_code=409)

    @app.exception_handler(PublishFailed)
    async def broker_down(_: Request, exc: PublishFailed) -> JSONResponse:
        log.error("command refused, broker unavailable: %s", exc)
        body = ErrorOut(detail="message broker unavailable: nothing was done, try again later")
        return JSONResponse(body.model_dump(), status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(IdempotencyConflict)
    async def key_conflict(_: Request, exc: IdempotencyConflict) -> JSONResponse:
        return JSONResponse(ErrorOut(detail=exc.detail).model_dump(), status_code=409)

    @app.exception_handler(RequestValidationError)
    async def invalid_form(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            ProblemOut(field=str(error["loc"][-1]), message=error["msg"]) for error in exc.errors()
        ]
        return _report(422, f"upload has {len(errors)} problem{'s' * (len(errors) != 1)}", errors)

    default_http_handler = app.exception_handlers[StarletteHTTPException]

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code != 413:
            answer = default_http_handler(request, exc)
            return cast(JSONResponse, await answer if inspect.isawaitable(answer) else answer)
        message = f"upload is larger than the {settings.max_csv_bytes}-byte limit"
        return _report(413, message, [ProblemOut(field="file", message=message)])


class UploadSizeLimit:
    """Refuse an oversized upload as it streams in, before it is spooled to disk.

    The error is raised from `receive`, inside the route, so the app's handler turns it
    into the usual JSON problem report. The CSV parser enforces the exact file limit.
    """

    def __init__(self, app: ASGIApp, path: str, max_bytes: int) -> None:
        self.app, self.path, self.max_bytes = app, path, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path:
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            if declared.isdigit() and int(declared) > self.max_bytes:
                raise StarletteHTTPException(413)
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise StarletteHTTPException(413)
            return message

        await self.app(scope, limited_receive, send)


def _report(status_code: int, detail: str, errors: list[ProblemOut]) -> JSONResponse:
    body = ProblemReport(detail=detail, errors=errors)
    return JSONResponse(body.model_dump(), status_code=status_code)
