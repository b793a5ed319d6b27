"""The status API: GET /status/{id} and GET /status/{id}/output.csv."""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request, Response, status

from imgpipe.contracts.settings import Settings
from imgpipe.contracts.web import require_api_key
from imgpipe.status.adapters.repository import StatusRepository
from imgpipe.status.schemas import ErrorBody, StatusResponse
from imgpipe.status.views import is_visible, output_csv, status_view

_NOT_FOUND = {404: {"model": ErrorBody, "description": "unknown request id"}}
_UNAUTHORIZED = {401: {"model": ErrorBody, "description": "missing or invalid API key"}}


def status_router(settings: Settings) -> APIRouter:
    router = APIRouter(
        prefix="/status",
        tags=["status"],
        dependencies=[Depends(require_api_key(settings))],
        responses=_UNAUTHORIZED,
    )

    @router.get("/{request_id}", response_model=StatusResponse, responses=_NOT_FOUND)
    async def get_status(request_id: str, request: Request) -> Response:
        doc = await _find(request, request_id)
        # Serialised straight from the model in pydantic-core; FastAPI would otherwise
        # validate it again and go through a dict and json.dumps (hot path).
        body = status_view(doc).model_dump_json()
        return Response(body, media_type="application/json")

    @router.get(
        "/{request_id}/output.csv",
        response_class=Response,
        responses={
            **_NOT_FOUND,
            200: {"content": {"text/csv": {}}, "description": "the output CSV"},
        },
    )
    async def get_output_csv(request_id: str, request: Request) -> Response:
        view = status_view(await _find(request, request_id))
        return Response(
            output_csv(view),
            media_type="text/csv; charset=utf-8",
            headers={
                "Content-Disposition": f'attachment; filename="{_safe_filename(request_id)}.csv"',
                # The file is served before the request finishes too (partial rows).
                "X-Imgpipe-Status": view.status,
            },
        )

    return router


def _safe_filename(request_id: str) -> str:
    """Ids come from ingest, but the header must never carry quotes or line breaks."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", request_id)


async def _find(request: Request, request_id: str) -> dict[str, Any]:
    repository: StatusRepository = request.app.state.repository
    doc = await repository.get(request_id)
    if not is_visible(doc):
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"unknown request {request_id}")
    assert doc is not None
    return doc
