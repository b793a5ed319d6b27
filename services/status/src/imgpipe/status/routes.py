"""The status API: GET /status/{id}, GET /status/{id}/output.csv and GET /requests.

Both answer from the read cache (`read_cache.py`): rendered bytes, served as they are,
with a strong ETag so that a poller sending `If-None-Match` gets a bodiless 304 while
nothing changed. The cache holds a request's first page of products (the default view,
the whole answer up to 1,000 products); another page is its cached summary plus the
rows and image pages of that page, read when asked. The CSV of a request over 1,000
products is streamed, a page of rows at a time.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response, status
from fastapi.responses import StreamingResponse

from imgpipe.contracts.settings import Settings
from imgpipe.contracts.web import require_api_key
from imgpipe.status.adapters.repository import StatusRepository
from imgpipe.status.bootstrap import Runtime
from imgpipe.status.listing import BadCursor as BadListCursor
from imgpipe.status.listing import list_page
from imgpipe.status.read_cache import ReadCache
from imgpipe.status.schemas import ErrorBody, ListedStatus, RequestList, StatusResponse
from imgpipe.status.views import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    BadCursor,
    Rendered,
    Summary,
    csv_lines,
    decode_cursor,
    page_products,
    render_page,
)

Responses = dict[int | str, dict[str, Any]]
_NOT_FOUND: Responses = {404: {"model": ErrorBody, "description": "unknown request id"}}
_UNAUTHORIZED: Responses = {401: {"model": ErrorBody, "description": "missing or invalid API key"}}
_NOT_MODIFIED: Responses = {304: {"description": "unchanged since the ETag given in If-None-Match"}}
# Clients may keep an answer but must ask again (cheaply, with If-None-Match) before using it.
_CACHE_CONTROL = "no-cache"


def read_cache(request: Request) -> ReadCache:
    runtime: Runtime = request.app.state.runtime
    return runtime.read_cache


Cache = Annotated[ReadCache, Depends(read_cache)]


def repository(request: Request) -> StatusRepository:
    runtime: Runtime = request.app.state.runtime
    return runtime.repository


Repository = Annotated[StatusRepository, Depends(repository)]
DEFAULT_PAGE = 50
MAX_PAGE = 200  # a page reads the outcomes of its unfinished requests: keep it bounded
CSV_PAGE = 1000  # rows read and written at a time when the output CSV is streamed
_BAD_PAGE: Responses = {422: {"model": ErrorBody, "description": "bad cursor or limit"}}


def status_router(settings: Settings) -> APIRouter:
    router = APIRouter(
        prefix="/status",
        tags=["status"],
        dependencies=[Depends(require_api_key(settings))],
        responses=_UNAUTHORIZED,
    )

    # response_model documents the body; the route returns the cached bytes as they are.
    @router.get(
        "/{request_id}",
        response_model=StatusResponse,
        responses={**_NOT_FOUND, **_NOT_MODIFIED, **_BAD_PAGE},
    )
    async def get_status(
        request_id: str,
        request: Request,
        cache: Cache,
        repository: Repository,
        limit: Annotated[
            int, Query(ge=1, le=MAX_LIMIT, description="the most products in this page")
        ] = DEFAULT_LIMIT,
        after: Annotated[
            str | None, Query(description="the `next` cursor of the previous page")
        ] = None,
    ) -> Response:
        """The request's state, progress and totals, with one page of its products."""
        start = _start_of(after)
        rendered = await _find(cache, request_id)
        if start or limit != DEFAULT_LIMIT:
            rendered = await _page(repository, rendered, request_id, start, limit)
        if rendered.gzipped is not None and accepts_gzip(request.headers.get("accept-encoding")):
            return _answer(
                request,
                rendered.gzipped,
                rendered.gzip_etag,
                "application/json",
                {"Content-Encoding": "gzip", "Vary": "Accept-Encoding"},
                also_matches=rendered.etag,
            )
        vary = {"Vary": "Accept-Encoding"} if rendered.gzipped is not None else {}
        return _answer(
            request,
            rendered.body,
            rendered.etag,
            "application/json",
            vary,
            also_matches=rendered.gzip_etag,
        )

    @router.get(
        "/{request_id}/output.csv",
        response_class=Response,
        responses={
            **_NOT_FOUND,
            **_NOT_MODIFIED,
            200: {"content": {"text/csv": {}}, "description": "the output CSV"},
        },
    )
    async def get_output_csv(
        request_id: str, request: Request, cache: Cache, repository: Repository
    ) -> Response:
        rendered = await _find(cache, request_id)
        headers = {
            "Content-Disposition": f'attachment; filename="{_safe_filename(request_id)}.csv"',
            # The file is served before the request finishes too (partial rows).
            "X-Imgpipe-Status": rendered.status,
        }
        if rendered.whole or rendered.summary is None:
            return _answer(
                request, rendered.csv, rendered.csv_etag, "text/csv; charset=utf-8", headers
            )
        # No ETag: the file is written as it is read, so its tag is known only at the end.
        rows = _csv_stream(repository, request_id, rendered.summary)
        headers["Cache-Control"] = _CACHE_CONTROL
        return StreamingResponse(rows, media_type="text/csv; charset=utf-8", headers=headers)

    return router


def requests_router(settings: Settings) -> APIRouter:
    router = APIRouter(
        tags=["requests"],
        dependencies=[Depends(require_api_key(settings))],
        responses=_UNAUTHORIZED,
    )

    # Read from the database, not the read cache: a list is not worth an entry per page.
    @router.get(
        "/requests",
        response_model=RequestList,
        responses={422: {"model": ErrorBody, "description": "bad cursor, status or limit"}},
    )
    async def list_requests(
        repository: Repository,
        status_filter: Annotated[
            ListedStatus | None, Query(alias="status", description="only requests in it")
        ] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = DEFAULT_PAGE,
        before: Annotated[
            str | None, Query(description="the `next` cursor of the previous page")
        ] = None,
    ) -> dict[str, Any]:
        """Requests, newest first, a page at a time."""
        try:
            return await list_page(repository, status_filter, before, limit)
        except BadListCursor as exc:
            detail = f"before: not a cursor from GET /requests ({exc}); start again without it"
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=detail) from None

    return router


def _answer(
    request: Request,
    body: bytes,
    etag: str,
    media_type: str,
    extra: dict[str, str] | None = None,
    also_matches: str | None = None,
) -> Response:
    """The body, or 304 if the client holds it already (in this or, `also_matches`,
    the other encoding: same content, so nothing to send either way)."""
    headers = {"ETag": etag, "Cache-Control": _CACHE_CONTROL, **(extra or {})}
    if_none_match = request.headers.get("if-none-match")
    if etag_matches(if_none_match, etag) or (
        also_matches is not None and etag_matches(if_none_match, also_matches)
    ):
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
    return Response(body, media_type=media_type, headers=headers)


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """RFC 9110 If-None-Match: `*` or a list of tags, compared weakly (W/ ignored)."""
    if not if_none_match:
        return False
    if if_none_match.strip() == "*":
        return True
    return any(tag.strip().removeprefix("W/") == etag for tag in if_none_match.split(","))


def accepts_gzip(accept_encoding: str | None) -> bool:
    """Whether Accept-Encoding allows gzip: named (or `*`) without `q=0`."""
    for item in (accept_encoding or "").split(","):
        coding, _, params = item.partition(";")
        if coding.strip().lower() in ("gzip", "x-gzip", "*"):
            return not _q_is_zero(params)
    return False


def _q_is_zero(params: str) -> bool:
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "q":
            try:
                return float(value) == 0
            except ValueError:
                return False
    return False


def _safe_filename(request_id: str) -> str:
    """Ids come from ingest, but the header must never carry quotes or line breaks."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", request_id)


def _start_of(after: str | None) -> int:
    if after is None:
        return 0
    try:
        return decode_cursor(after)
    except BadCursor as exc:
        detail = f"after: not a cursor from GET /status ({exc}); start again without it"
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=detail) from None


async def _page(
    repository: StatusRepository, first: Rendered, request_id: str, start: int, limit: int
) -> Rendered:
    """A page other than the cached first one: the cached summary, and the rows and
    outcomes of this page alone (one read of each, whatever the request's size)."""
    summary = first.summary
    assert summary is not None  # every answer the cache holds has its summary
    if start > summary.products_total:
        detail = f"after: past the request's {summary.products_total} products"
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=detail)
    found = await repository.rows_page(request_id, start, limit)
    if found is None:  # deleted since the summary was read
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"unknown request {request_id}")
    rows, doc = found
    return render_page(summary, rows, start, doc, limit)


async def _csv_stream(
    repository: StatusRepository, request_id: str, summary: Summary
) -> AsyncIterator[bytes]:
    """The output CSV, `CSV_PAGE` rows at a time: never more than a page in memory."""
    yield csv_lines([], header=True).encode()
    for start in range(0, summary.products_total, CSV_PAGE):
        found = await repository.rows_page(request_id, start, CSV_PAGE)
        if found is None:  # deleted meanwhile: the file ends here
            return
        rows, doc = found
        yield csv_lines(page_products(rows, start, doc)).encode()


async def _find(cache: ReadCache, request_id: str) -> Rendered:
    rendered = await cache.get(request_id)
    if rendered is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"unknown request {request_id}")
    return rendered
