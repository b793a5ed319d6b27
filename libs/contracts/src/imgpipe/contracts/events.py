"""The public events, as CloudEvents 1.0 in JSON structured mode.

Three tell a request's life (RequestReceived, ImageProcessed, RequestCompleted); the
rest manage it: ingest asks (CancelRequested, RetryRequested, RequestDeleted), the
processor answers (RequestCancelled, RetryStarted). See docs/architecture.md, "Events".
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, ClassVar, Generic, Literal, TypeVar, cast

from pydantic import BaseModel, ConfigDict, Field

CONTENT_TYPE = "application/cloudevents+json"


def utcnow() -> datetime:
    return datetime.now(UTC)


class Row(BaseModel):
    """One CSV row: a product and its input image URLs, in input order."""

    serial_number: str
    product_name: str
    input_urls: list[str]


OutputFormat = Literal["auto", "jpeg", "webp", "avif"]
# The longest side WebP can hold; the processor refuses inputs with a longer one.
MAX_SIDE = 16_383


class Options(BaseModel):
    """How a request's images are encoded."""

    quality: Annotated[int, Field(ge=1, le=95)] = 50
    # auto: JPEG for opaque images, WebP for images with transparency.
    format: OutputFormat = "auto"
    # The longest side in pixels; None keeps the size. Never enlarges an image.
    max_side: Annotated[int, Field(ge=1, le=MAX_SIDE)] | None = None
    progressive: bool = False  # progressive JPEG (loads blurry first, then sharpens)


class EventData(BaseModel):
    """Base of every event payload; subclasses name their CloudEvents type and routing key."""

    model_config = ConfigDict(extra="ignore")

    event_type: ClassVar[str]
    routing_key: ClassVar[str]
    request_id: str


class RequestReceived(EventData):
    event_type: ClassVar[str] = "io.imgpipe.request.received.v1"
    routing_key: ClassVar[str] = "request.received"

    rows: list[Row]
    image_count: int
    options: Options = Options()
    webhook_url: str | None = None
    received_at: datetime
    # True: process every image anew, reusing no earlier output (a later upload of the
    # same URLs otherwise reuses what the host says has not changed).
    refresh: bool = False


Reused = Literal["not_modified", "same_bytes"]


class ImageError(BaseModel):
    code: str
    message: str


class Tally(BaseModel):
    """The processor's running totals for a request, as they stood once the batch that
    recorded an image was counted: whole-request counts (a retry round's failed images
    stop counting as failed when it opens), and bytes and reuse of the images stored so
    far, each image URL once. Readers keep the highest value of each field per round
    (events arrive in any order), so progress needs no count of every outcome. A running
    figure: a crash between an outcome and its count may leave the bytes a little low;
    the counts are caught up, and RequestCompleted's are exact."""

    ok: int
    failed: int
    stored: int = 0  # image URLs stored (an output made or reused)
    bytes_in: int = 0
    bytes_out: int = 0
    not_modified: int = 0  # places whose output was reused, by reason (as `reused`)
    same_bytes: int = 0


class ImageProcessed(EventData):
    event_type: ClassVar[str] = "io.imgpipe.image.processed.v1"
    routing_key: ClassVar[str] = "image.processed"

    image_key: str  # "<row index>-<position>", both zero-based
    row_index: int
    position: int
    input_url: str
    outcome: Literal["ok", "failed"]
    output_url: str | None = None
    bytes_in: int | None = None
    bytes_out: int | None = None
    width: int | None = None
    height: int | None = None
    format: str | None = None
    # Whether the output is the input's own bytes minus metadata (it needed no change and
    # its encode came out larger); None for a failed image or one recorded before this.
    kept_input: bool | None = None
    # Whether the output is one stored earlier, and why: "not_modified" (the host
    # answered 304 to a conditional request: nothing downloaded or encoded) or
    # "same_bytes" (the download hashed to an input already encoded with the same
    # options: nothing encoded). None when encoded now, or failed.
    reused: Reused | None = None
    error: ImageError | None = None
    # Download attempts made for the image (retries of transient failures included);
    # None when no download was tried.
    attempts: int | None = None
    # 0 for the request's first run; N for the Nth retry of its failed images. A later
    # round's outcome replaces an earlier one of the same image.
    round: int = 0
    # The request's running totals after this image was counted; None in events
    # published again after a crash, and in events from before it existed.
    tally: Tally | None = None


class Counts(BaseModel):
    total: int
    ok: int
    failed: int


class RequestCompleted(EventData):
    event_type: ClassVar[str] = "io.imgpipe.request.completed.v1"
    routing_key: ClassVar[str] = "request.completed"

    status: Literal["completed", "error"]
    counts: Counts
    completed_at: datetime
    round: int = 0  # the run that ended: 0 first, N after the Nth retry


class CancelRequested(EventData):
    """A user asked to stop a running request (ingest -> processor)."""

    event_type: ClassVar[str] = "io.imgpipe.request.cancel_requested.v1"
    routing_key: ClassVar[str] = "request.cancel_requested"

    requested_at: datetime


class RequestCancelled(EventData):
    """The request was stopped: no image of it starts any more. Its final event, in
    place of RequestCompleted. Images already in progress may still finish after it,
    and keep their outputs; `counts` are those known when it stopped."""

    event_type: ClassVar[str] = "io.imgpipe.request.cancelled.v1"
    routing_key: ClassVar[str] = "request.cancelled"

    counts: Counts
    cancelled_at: datetime
    round: int = 0


class RetryRequested(EventData):
    """A user asked to run a finished request's failed images again (ingest -> processor)."""

    event_type: ClassVar[str] = "io.imgpipe.request.retry_requested.v1"
    routing_key: ClassVar[str] = "request.retry_requested"

    round: int  # 1 for the first retry, then 2, ...
    requested_at: datetime


class RetryStarted(EventData):
    """The processor runs these images of a finished request again: the request is
    processing again, until a RequestCompleted of the same round."""

    event_type: ClassVar[str] = "io.imgpipe.request.retry_started.v1"
    routing_key: ClassVar[str] = "request.retry_started"

    round: int
    image_keys: list[str]
    started_at: datetime


class RequestDeleted(EventData):
    """A user (or the retention sweep) deleted the request: every service drops what it
    holds of it, and the processor deletes its stored images."""

    event_type: ClassVar[str] = "io.imgpipe.request.deleted.v1"
    routing_key: ClassVar[str] = "request.deleted"

    reason: Literal["user", "retention"] = "user"
    deleted_at: datetime


def image_key(row_index: int, position: int) -> str:
    return f"{row_index}-{position}"


EVENT_TYPES: dict[str, type[EventData]] = {
    model.event_type: model
    for model in (
        RequestReceived,
        ImageProcessed,
        RequestCompleted,
        CancelRequested,
        RequestCancelled,
        RetryRequested,
        RetryStarted,
        RequestDeleted,
    )
}

D = TypeVar("D", bound=EventData)


class CloudEvent(BaseModel, Generic[D]):
    """CloudEvents 1.0 envelope. `id` is stable for the same fact so consumers can dedupe."""

    specversion: Literal["1.0"] = "1.0"
    id: str
    source: str
    type: str
    subject: str
    time: datetime = Field(default_factory=utcnow)
    datacontenttype: Literal["application/json"] = "application/json"
    # The CloudEvents distributed tracing extension: the W3C trace context of the
    # request's trace (docs/architecture.md, "Traces"). Optional: older events lack it.
    traceparent: str | None = Field(
        None,
        description="W3C traceparent of the request's trace (CloudEvents distributed tracing)",
    )
    data: D

    @classmethod
    def wrap(
        cls, data: D, *, source: str, id: str, traceparent: str | None = None
    ) -> CloudEvent[D]:
        # Parametrized by the payload's own class, so that it is validated and
        # serialized as that class (with its fields), not as the EventData base.
        envelope = cast("type[CloudEvent[D]]", CloudEvent.__class_getitem__(type(data)))
        return envelope(
            id=id,
            source=source,
            type=data.event_type,
            subject=data.request_id,
            traceparent=traceparent,
            data=data,
        )

    @property
    def routing_key(self) -> str:
        return self.data.routing_key

    def to_bytes(self) -> bytes:
        # An extension attribute without a value is left out, as CloudEvents asks.
        absent = {"traceparent"} if self.traceparent is None else None
        return self.model_dump_json(exclude=absent).encode()


AnyEvent = (
    CloudEvent[RequestReceived]
    | CloudEvent[ImageProcessed]
    | CloudEvent[RequestCompleted]
    | CloudEvent[CancelRequested]
    | CloudEvent[RequestCancelled]
    | CloudEvent[RetryRequested]
    | CloudEvent[RetryStarted]
    | CloudEvent[RequestDeleted]
)


class UnknownEventType(ValueError):
    pass


class _EventType(BaseModel):
    """An event's `type` alone: read first, to pick the model that parses the rest.

    A class of its own at module level: a parametrized `CloudEvent[...]` made inside
    parse_event is held only weakly by pydantic's cache, so each garbage collection
    dropped it and the next event built the class again (~0.5 ms)."""

    type: str


def parse_event(body: bytes | str) -> AnyEvent:
    """Parse a structured-mode CloudEvent into the typed envelope its `type` names."""
    envelope = _EventType.model_validate_json(body)
    model = EVENT_TYPES.get(envelope.type)
    if model is None:
        raise UnknownEventType(envelope.type)
    typed = cast("type[AnyEvent]", CloudEvent.__class_getitem__(model))
    return typed.model_validate_json(body)


def received_event_id(request_id: str) -> str:
    return f"{request_id}:received"


def _in_round(event_id: str, round: int) -> str:
    """Round 0 keeps the ids events had before retries existed."""
    return f"{event_id}:r{round}" if round else event_id


def processed_event_id(request_id: str, key: str, round: int = 0) -> str:
    return _in_round(f"{request_id}:image:{key}", round)


def completed_event_id(request_id: str, round: int = 0) -> str:
    return _in_round(f"{request_id}:completed", round)


def cancel_requested_event_id(request_id: str) -> str:
    return f"{request_id}:cancel-requested"


def cancelled_event_id(request_id: str) -> str:
    return f"{request_id}:cancelled"


def retry_requested_event_id(request_id: str, round: int) -> str:
    return f"{request_id}:retry-requested:r{round}"


def retry_started_event_id(request_id: str, round: int) -> str:
    return f"{request_id}:retry-started:r{round}"


def deleted_event_id(request_id: str) -> str:
    return f"{request_id}:deleted"
