"""Response bodies of the status API (docs/architecture.md, "HTTP")."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

# `cancelled` is final, like `completed` and `error`; a retry of a finished request's
# failed images makes it `processing` again (`round` says which run).
Status = Literal["received", "processing", "completed", "error", "cancelled"]
# The list takes (and shows) the same values.
ListedStatus = Status


class Progress(BaseModel):
    total: int
    ok: int
    failed: int


class ImageErrorOut(BaseModel):
    code: str
    message: str


class Product(BaseModel):
    """One input row; the lists are aligned with `input_urls`."""

    serial_number: str
    product_name: str
    input_urls: list[str]
    output_urls: list[str | None]
    errors: list[ImageErrorOut | None]
    # Download attempts per image (retries of a throttling or failing host included);
    # null while the image is pending, or when nothing was downloaded.
    attempts: list[int | None]
    # Per image: "not_modified" (its host answered 304: the output stored for an
    # earlier request is reused, nothing downloaded), "same_bytes" (its bytes were
    # encoded before with the same options), or null (made for this request; pending;
    # failed).
    reused: list[Literal["not_modified", "same_bytes"] | None]


class ReusedOut(BaseModel):
    """Images whose output was reused rather than made anew, each place in the CSV once."""

    images: int
    not_modified: int
    same_bytes: int


class OptionsOut(BaseModel):
    """How the request asked its images to be encoded."""

    quality: int
    format: Literal["auto", "jpeg", "webp", "avif"]
    max_side: int | None
    progressive: bool


class BytesOut(BaseModel):
    """Sizes of the images stored so far, each distinct image once."""

    images: int
    input: int
    output: int
    ratio: float | None  # output / input; null before the first image is stored


class StatusResponse(BaseModel):
    request_id: str
    status: Status
    # The run shown: 0 for the request's first, N once its failed images were retried N
    # times. A retried image is pending again until its outcome of that round arrives.
    round: int = 0
    progress: Progress
    options: OptionsOut
    bytes: BytesOut
    reused: ReusedOut
    # One page of products, in input order: from the row `after` points at (the first
    # without it), at most `limit` of them. Every request of up to 1,000 products gets
    # them all in the first page.
    products: list[Product]
    products_total: int = Field(description="the request's products (CSV rows), all pages")
    limit: int = Field(description="the most products this page holds")
    next: str | None = Field(
        description="opaque cursor: pass it as `after` for the next page; null at the end"
    )
    error_message: str | None
    created_at: datetime
    updated_at: datetime
    # The request's trace (32 hex digits), as the upload's 202 said; null for requests
    # received before traces.
    trace_id: str | None = None


class RequestSummary(BaseModel):
    request_id: str
    status: ListedStatus
    progress: Progress
    created_at: datetime
    updated_at: datetime  # the latest event that changed the request
    product_count: int


class RequestList(BaseModel):
    items: list[RequestSummary]  # newest first
    next: str | None = Field(
        description="opaque cursor: pass it as `before` for the next page; null at the end"
    )


class ErrorBody(BaseModel):
    detail: str
