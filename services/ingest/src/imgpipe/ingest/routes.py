"""The ingest API beyond the health routes: `POST /upload`, and the commands on a
submitted request (`POST /requests/{id}/cancel`, `POST /requests/{id}/retry`,
`DELETE /requests/{id}`)."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any

from fastapi import (
    APIRouter,
    Depends,
    File,
    Form,
    Header,
    HTTPException,
    Request,
    UploadFile,
    status,
)
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from opentelemetry.trace import SpanKind

from imgpipe.contracts.events import MAX_SIDE, Options, OutputFormat
from imgpipe.contracts.settings import Settings
from imgpipe.contracts.tracing import TRACEPARENT, span
from imgpipe.contracts.web import require_api_key
from imgpipe.ingest import commands, handlers
from imgpipe.ingest.bootstrap import Runtime
from imgpipe.ingest.config import OutboxConfig
from imgpipe.ingest.csv_input import CsvLimits
from imgpipe.ingest.schemas import CommandAccepted, ErrorOut, ProblemReport, UploadAccepted


def runtime(request: Request) -> Runtime:
    """The running service, for `Depends`."""
    running: Runtime = request.app.state.runtime
    return running


# The caller's API key, to scope Idempotency-Keys; require_api_key has checked it.
_bearer = HTTPBearer(auto_error=False)


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
            400: {"model": ErrorOut, "description": "Idempotency-Key longer than 255 characters"},
            409: {
                "model": ErrorOut,
                "description": "Idempotency-Key already used for a different upload, "
                "or its first upload is still being accepted",
            },
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
        refresh: Annotated[
            bool,
            Form(
                description="process every image anew: reuse no output of an earlier "
                "request, even where the host says the image has not changed"
            ),
        ] = False,
        idempotency_key: Annotated[
            str | None,
            Header(
                alias="Idempotency-Key",
                description="the same key and upload within 24 h answer the first 202 again",
            ),
        ] = None,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)] = None,
    ) -> UploadAccepted:
        """Accept a CSV; images are processed in the background. Poll `status_url`."""
        options = Options(
            quality=quality, format=format, max_side=max_side, progressive=progressive
        )
        upload = handlers.Upload(
            file=file.file, options=options, webhook_url=webhook_url, refresh=refresh
        )
        trace_ids: dict[str, str | None] = {}

        async def accept() -> handlers.IngestRequest:
            accepted = await handlers.accept_upload(
                upload,
                limits=limits,
                repository=service.repository,
                publisher=service.publisher,
                relay_grace=relay_grace,
            )
            trace_ids[accepted.request_id] = accepted.trace_id
            return accepted

        def answer(request_id: str) -> dict[str, Any]:
            status_url = f"{settings.status_base_url}/status/{request_id}"
            accepted = UploadAccepted(
                request_id=request_id, status_url=status_url, trace_id=trace_ids.get(request_id)
            )
            return accepted.model_dump()

        # The request's trace starts here, or continues the caller's.
        with span(
            "POST /upload", parent=http.headers.get(TRACEPARENT), kind=SpanKind.SERVER
        ) as upload_span:
            if idempotency_key is None:
                body = answer((await accept()).request_id)
            else:
                if not 0 < len(idempotency_key) <= handlers.MAX_KEY_CHARS:
                    raise HTTPException(
                        status.HTTP_400_BAD_REQUEST,
                        detail=f"Idempotency-Key must be 1 to {handlers.MAX_KEY_CHARS} characters",
                    )
                # Scoped by API key only when keys are set: without them every client is one.
                api_key = credentials.credentials if settings.api_keys and credentials else None
                body = await handlers.accept_once(
                    upload,
                    handlers.key_id(idempotency_key, api_key),
                    keys=service.keys,
                    accept=accept,
                    answer=answer,
                )
            upload_span.set_attribute("request_id", body["request_id"])
        return UploadAccepted.model_validate(body)

    return router


COMMAND_RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorOut, "description": "no such request"},
    409: {"model": ErrorOut, "description": "not in a state that allows it; says why"},
    503: {"model": ErrorOut, "description": "broker or database unavailable; nothing done"},
}


def requests_router(settings: Settings) -> APIRouter:
    """Commands on a request: each is checked here and carried out by the other services
    through events; the answer is 202 and `status_url` shows the effect."""
    router = APIRouter(prefix="/requests", dependencies=[Depends(require_api_key(settings))])

    def accepted(request_id: str, command: str, round: int | None = None) -> CommandAccepted:
        status_url = f"{settings.status_base_url}/status/{request_id}"
        return CommandAccepted(
            request_id=request_id, command=command, round=round, status_url=status_url
        )

    @router.post(
        "/{request_id}/cancel",
        status_code=status.HTTP_202_ACCEPTED,
        response_model=CommandAccepted,
        responses=COMMAND_RESPONSES,
    )
    async def cancel(
        request_id: str, service: Annotated[Runtime, Depends(runtime)]
    ) -> CommandAccepted:
        """Stop a running request: images not yet started are not processed, and it
        ends as `cancelled`. 409 once it has finished."""
        await commands.cancel(request_id, service.repository, service.publisher)
        return accepted(request_id, "cancel")

    @router.post(
        "/{request_id}/retry",
        status_code=status.HTTP_202_ACCEPTED,
        response_model=CommandAccepted,
        responses=COMMAND_RESPONSES,
    )
    async def retry(
        request_id: str, service: Annotated[Runtime, Depends(runtime)]
    ) -> CommandAccepted:
        """Run the failed images of a finished request again; the others keep their
        outputs. 409 while it runs, when it was cancelled, or when none failed."""
        round = await commands.retry(request_id, service.repository, service.publisher)
        return accepted(request_id, "retry", round)

    @router.delete(
        "/{request_id}",
        status_code=status.HTTP_202_ACCEPTED,
        response_model=CommandAccepted,
        responses=COMMAND_RESPONSES,
    )
    async def delete(
        request_id: str, service: Annotated[Runtime, Depends(runtime)]
    ) -> CommandAccepted:
        """Delete the request everywhere, its stored images included; its status then
        answers 404. A running request stops first."""
        await commands.delete(request_id, service.repository, service.publisher, service.keys)
        return accepted(request_id, "delete")

    return router
