"""The ingest service: `POST /upload` and the outbox relay."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from datetime import timedelta
from typing import Annotated

from fastapi import Depends, FastAPI, File, Form, Request, UploadFile, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imgpipe.contracts.bus import Bus
from imgpipe.contracts.mongo import connect, ping, service_database
from imgpipe.contracts.settings import Settings
from imgpipe.contracts.topology import Topology
from imgpipe.contracts.web import health_router, require_api_key
from imgpipe.ingest import handlers
from imgpipe.ingest.adapters.publisher import EventPublisher
from imgpipe.ingest.adapters.repository import IngestRepository
from imgpipe.ingest.config import OutboxConfig
from imgpipe.ingest.csv_input import CsvLimits
from imgpipe.ingest.domain import StoreUnavailable, UploadRejected
from imgpipe.ingest.schemas import ErrorOut, ProblemOut, ProblemReport, UploadAccepted

log = logging.getLogger(__name__)

# Multipart framing and the small form fields, on top of the CSV itself.
FORM_OVERHEAD_BYTES = 64 * 1024


def create_app(settings: Settings | None = None, *, outbox: OutboxConfig | None = None) -> FastAPI:
    settings = settings or Settings()
    outbox = outbox or OutboxConfig()
    limits = CsvLimits(
        settings.max_csv_bytes,
        settings.max_rows,
        settings.max_images,
        settings.allow_private_urls,
        settings.max_event_bytes,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        mongo = connect(settings)
        repository = IngestRepository(service_database(mongo, settings, "ingest"))
        topology = Topology(settings.namespace, settings.delivery_limit)
        publisher = EventPublisher(
            lambda: Bus.connect(
                settings.amqp_url, topology, prefetch=settings.prefetch or 1, service="ingest"
            ),
            publish_timeout=outbox.publish_timeout,
            retry_interval=outbox.connect_retry,
        )
        await publisher.start()
        relay = asyncio.create_task(
            handlers.run_relay(
                repository,
                publisher,
                interval=outbox.interval,
                lease=timedelta(seconds=outbox.lease),
                batch=outbox.batch,
            ),
            name="ingest-outbox-relay",
        )
        app.state.mongo, app.state.repository, app.state.publisher = mongo, repository, publisher
        try:
            yield
        finally:
            relay.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await relay
            await publisher.close()
            await mongo.close()

    async def checks() -> dict[str, bool]:
        publisher: EventPublisher | None = getattr(app.state, "publisher", None)
        mongo = getattr(app.state, "mongo", None)
        return {
            "broker": publisher is not None and publisher.is_connected,
            "database": mongo is not None and await ping(mongo),
        }

    app = FastAPI(
        title="imgpipe ingest",
        summary="Takes a CSV of product image URLs and starts processing it.",
        lifespan=lifespan,
    )
    app.include_router(health_router(checks))
    _add_error_handlers(app, settings)
    app.add_middleware(
        UploadSizeLimit, path="/upload", max_bytes=settings.max_csv_bytes + FORM_OVERHEAD_BYTES
    )
    status_base = (settings.public_base_url or f"http://127.0.0.1:{settings.status_port}").rstrip(
        "/"
    )

    @app.post(
        "/upload",
        status_code=status.HTTP_202_ACCEPTED,
        response_model=UploadAccepted,
        responses={
            413: {"model": ProblemReport, "description": "file, rows or images over the limit"},
            422: {"model": ProblemReport, "description": "every problem, with its CSV line"},
            503: {"model": ErrorOut, "description": "database unavailable; nothing stored"},
        },
        dependencies=[Depends(require_api_key(settings))],
    )
    async def upload(
        request: Request,
        file: Annotated[
            UploadFile, File(description="CSV: S. No., Product Name, Input Image Urls")
        ],
        webhook_url: Annotated[
            str | None, Form(description="http(s) URL told of every status change")
        ] = None,
        quality: Annotated[int, Form(ge=1, le=95, description="output quality")] = 50,
    ) -> UploadAccepted:
        """Accept a CSV; images are processed in the background. Poll `status_url`."""
        accepted = await handlers.accept_upload(
            handlers.Upload(file=file.file, quality=quality, webhook_url=webhook_url),
            limits=limits,
            repository=request.app.state.repository,
            publisher=request.app.state.publisher,
            relay_grace=timedelta(seconds=outbox.grace),
        )
        return UploadAccepted(
            request_id=accepted.request_id,
            status_url=f"{status_base}/status/{accepted.request_id}",
        )

    return app


def _add_error_handlers(app: FastAPI, settings: Settings) -> None:
    """Every refusal answers `{"detail", "errors": [...]}` (DESIGN.md, "HTTP")."""

    @app.exception_handler(UploadRejected)
    async def rejected(_: Request, exc: UploadRejected) -> JSONResponse:
        errors = [ProblemOut(**asdict(problem)) for problem in exc.problems]
        return _report(exc.status_code, exc.detail, errors)

    @app.exception_handler(StoreUnavailable)
    async def store_down(_: Request, exc: StoreUnavailable) -> JSONResponse:
        log.error("upload refused, database unavailable: %s", exc)
        body = ErrorOut(detail="database unavailable: nothing was stored, try again later")
        return JSONResponse(body.model_dump(), status_code=503, headers={"Retry-After": "5"})

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
            return await default_http_handler(request, exc)  # type: ignore[no-any-return]
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
