"""The ingest domain: an accepted request, a problem with an upload, and the ways an
upload can fail."""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from typing import Any, Literal

from imgpipe.contracts.events import CloudEvent, Options, RequestReceived, Row, received_event_id
from imgpipe.contracts.tracing import trace_id_of

SOURCE = "imgpipe.ingest"


def new_request_id() -> str:
    """122 random bits: request ids are unguessable, so a status URL is a capability."""
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an upload; `line` is the CSV line, `field` a form field."""

    message: str
    line: int | None = None
    column: str | None = None
    field: str | None = None


@dataclass(frozen=True)
class IngestRequest:
    request_id: str
    rows: list[Row]
    options: Options
    webhook_url: str | None
    received_at: datetime
    traceparent: str | None = None  # the request's trace, carried by its events
    refresh: bool = False  # reuse no output of an earlier request

    @property
    def trace_id(self) -> str | None:
        return trace_id_of(self.traceparent)

    @property
    def image_count(self) -> int:
        return sum(len(row.input_urls) for row in self.rows)

    def received_event(self) -> CloudEvent[RequestReceived]:
        data = RequestReceived(
            request_id=self.request_id,
            rows=self.rows,
            image_count=self.image_count,
            options=self.options,
            webhook_url=self.webhook_url,
            received_at=self.received_at,
            refresh=self.refresh,
        )
        return CloudEvent.wrap(
            data,
            source=SOURCE,
            id=received_event_id(self.request_id),
            traceparent=self.traceparent,
        )


RunState = Literal["processing", "completed", "error", "cancelled"]
FINISHED: frozenset[str] = frozenset({"completed", "error", "cancelled"})


@dataclass(frozen=True)
class Run:
    """What ingest knows of a request's progress, from the processor's events: enough to
    answer cancel and retry. `version` orders what it learns (round N starting is 2N,
    ending 2N+1), so a late event never undoes a newer one."""

    state: RunState = "processing"
    round: int = 0
    failed: int = 0
    version: int = 0
    finished_at: datetime | None = None
    # The request's trace, for the commands' events (not stored with the run).
    traceparent: str | None = field(default=None, compare=False)

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    @classmethod
    def from_doc(cls, doc: dict[str, Any] | None, traceparent: str | None = None) -> Run:
        return cls(**(doc or {}), traceparent=traceparent)

    def to_doc(self) -> dict[str, Any]:
        doc = asdict(self)
        del doc["traceparent"]
        return doc

    @classmethod
    def ended(cls, state: RunState, failed: int, at: datetime, round: int) -> Run:
        return cls(state, round, failed, 2 * round + 1, at)

    def retrying(self, round: int) -> Run:
        return replace(self, state="processing", round=round, version=2 * round, finished_at=None)


class UploadRejected(Exception):
    """The upload is refused as a whole (HTTP 4xx); nothing was stored or published."""

    def __init__(self, status_code: int, problems: list[Problem], total: int = 0) -> None:
        self.status_code = status_code
        self.problems = problems
        self.total = max(total, len(problems))
        in_file = any(problem.field in (None, "file") for problem in problems)
        subject = "CSV" if in_file else "upload"
        plural = "" if self.total == 1 else "s"
        self.detail = f"{subject} has {self.total} problem{plural}"
        super().__init__(self.detail)


class StoreUnavailable(Exception):
    """The database did not take the write; the client should retry later (HTTP 503)."""


class PublishFailed(Exception):
    """The broker did not confirm the event; the outbox relay will send it later."""


class UnknownRequest(Exception):
    """No such request (HTTP 404)."""


class Conflict(Exception):
    """The request is not in a state that allows the command (HTTP 409); says why."""


class IdempotencyConflict(Exception):
    """The Idempotency-Key is taken by another upload (HTTP 409); nothing was stored."""

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(detail)
