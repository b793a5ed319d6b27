"""`POST /upload`: the ingest API beyond the health routes."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile, status
from opentelemetry.trace import SpanKind

from imgpipe.contracts.events import MAX_SIDE, Options, OutputFormat
from imgpipe.contracts.settings import Settings
from imgpipe.contracts.tracing import TRACEPARENT, span
from imgpipe.contracts.web import require_api_key
from imgpipe.ingest import handlers
from imgpipe.ingest.bootstrap import Runtime
from imgpipe.ingest.config import OutboxConfig
from imgpipe.ingest.csv_input import CsvLimits
from imgpipe.ingest.schemas import ErrorOut, ProblemReport, UploadAccepted


def runtime(request: Request) -> Runtime:
    """The running service, for `Depends`."""
    running: Runtime = request.app.state.runtime
    return running


def upload_router(settings: Settings, outbox: OutboxConfig) -> APIRouter:
    limits = CsvLimits(
        settings.max_csv_bytes,
        settings.max_rows,
        settings.max_images,
        settings.allow_private_urls,
        settings.max_event_bytes,
    )
    relay_grace = timedelta(seconds=outbox.grace)
    router = APIRouter()

    @router.post(
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
        http: Request,
        service: Annotated[Runtime, Depends(runtime)],
        file: Annotated[
            UploadFile, File(description="CSV: S. No., Product Name, Input Image Urls")
        ],
        webhook_url: Annotated[
            str | None, Form(description="http(s) URL told of every status change")
        ] = None,
        quality: Annotated[int, Form(ge=1, le=95, description="output quality")] = 50,
        format: Annotated[
            OutputFormat,
            Form(description="auto (JPEG when opaque, WebP with transparency), jpeg, webp, avif"),
        ] = "auto",
        max_side: Annotated[
            int | None,
            Form(ge=1, le=MAX_SIDE, description="longest side in pixels; never enlarges"),
        ] = None,
        progressive: Annotated[bool, Form(description="progressive JPEG")] = False,
    ) -> UploadAccepted:
        """Accept a CSV; images are processed in the background. Poll `status_url`."""
        options = Options(
            quality=quality, format=format, max_side=max_side, progressive=progressive
        )
        # The request's trace starts here, or continues the caller's.
        with span(
            "POST /upload", parent=http.headers.get(TRACEPARENT), kind=SpanKind.SERVER
        ) as upload:
            accepted = await handlers.accept_upload(
                handlers.Upload(file=file.file, options=options, webhook_url=webhook_url),
                limits=limits,
                repository=service.repository,
                publisher=service.publisher,
                relay_grace=relay_grace,
            )
            upload.set_attributes(
                {"request_id": accepted.request_id, "image_count": accepted.image_count}
            )
        return UploadAccepted(
            request_id=accepted.request_id,
            status_url=f"{settings.status_base_url}/status/{accepted.request_id}",
            trace_id=accepted.trace_id,
        )

    return router
