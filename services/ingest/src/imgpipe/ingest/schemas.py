"""Response bodies of the ingest API."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class UploadAccepted(BaseModel):
    request_id: str
    status: Literal["received"] = "received"
    status_url: str = Field(description="GET it for progress (status service)")
    trace_id: str | None = Field(
        None, description="the request's trace (32 hex digits), continued from `traceparent`"
    )


class CommandAccepted(BaseModel):
    request_id: str
    command: Literal["cancel", "retry", "delete"]
    round: int | None = Field(None, description="retry: the round it starts (1, 2, ...)")
    status_url: str = Field(description="GET it to follow the effect (status service)")


class ProblemOut(BaseModel):
    line: int | None = Field(None, description="CSV line the row starts on (header = 1)")
    column: str | None = Field(None, description="CSV column, when one is at fault")
    field: str | None = Field(None, description="form field, when one is at fault")
    message: str


class ProblemReport(BaseModel):
    detail: str
    errors: list[ProblemOut] = []


class ErrorOut(BaseModel):
    detail: str
