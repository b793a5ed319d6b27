"""Event builders for tests: the three public events, filled in the way the services
fill them, with stable ids and times a test can reason about."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from imgpipe.contracts.events import (
    CloudEvent,
    Counts,
    ImageError,
    ImageProcessed,
    Options,
    RequestCancelled,
    RequestCompleted,
    RequestDeleted,
    RequestReceived,
    RetryStarted,
    Row,
    Tally,
    cancelled_event_id,
    completed_event_id,
    deleted_event_id,
    image_key,
    processed_event_id,
    received_event_id,
    retry_started_event_id,
)

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
FAILED_ATTEMPTS = 3  # a failed image's attempts, unless a test says otherwise


def new_request_id() -> str:
    return "req-" + uuid.uuid4().hex[:12]


def rows_of(urls_per_row: Sequence[Sequence[str]]) -> list[Row]:
    """Rows numbered from 1, named "Product N"."""
    return [
        Row(serial_number=str(n), product_name=f"Product {n}", input_urls=list(urls))
        for n, urls in enumerate(urls_per_row, start=1)
    ]


def received(
    request_id: str,
    rows: Sequence[Row],
    *,
    webhook_url: str | None = None,
    at: datetime = T0,
    options: Options | None = None,
) -> CloudEvent[RequestReceived]:
    data = RequestReceived(
        request_id=request_id,
        rows=list(rows),
        image_count=sum(len(row.input_urls) for row in rows),
        options=options or Options(),
        webhook_url=webhook_url,
        received_at=at,
    )
    return CloudEvent.wrap(data, source="test", id=received_event_id(request_id))


def processed(
    request_id: str,
    row: int,
    position: int,
    *,
    input_url: str = "http://in/x.jpg",
    ok: bool = True,
    message: str = "HTTP 404",
    attempts: int | None = None,
    at: datetime | None = None,
    tally: Tally | None = None,
) -> CloudEvent[ImageProcessed]:
    """An ok image (1000 bytes in, 300 out, 10x10 JPEG under http://media/<id>/<key>.jpg)
    or a failed one (`download_failed` with `message`); the event time defaults to
    T0 + 1 s + 10 s a row + 1 s a position. `tally`: the request's totals the processor
    sends with it."""
    key = image_key(row, position)
    data = ImageProcessed(
        request_id=request_id,
        image_key=key,
        row_index=row,
        position=position,
        input_url=input_url,
        outcome="ok" if ok else "failed",
        output_url=f"http://media/{request_id}/{key}.jpg" if ok else None,
        bytes_in=1000 if ok else None,
        bytes_out=300 if ok else None,
        width=10 if ok else None,
        height=10 if ok else None,
        format="JPEG" if ok else None,
        error=None if ok else ImageError(code="download_failed", message=message),
        attempts=attempts if attempts is not None else (1 if ok else FAILED_ATTEMPTS),
        tally=tally,
    )
    event = CloudEvent.wrap(data, source="test", id=processed_event_id(request_id, key))
    event.time = at or T0 + timedelta(seconds=1 + row * 10 + position)
    return event


def processed_for(
    request_id: str, rows: Sequence[Row], failed: set[tuple[int, int]] = frozenset()
) -> list[CloudEvent[ImageProcessed]]:
    """An outcome for every image of `rows`; the places in `failed` fail."""
    return [
        processed(request_id, r, p, input_url=url, ok=(r, p) not in failed)
        for r, row in enumerate(rows)
        for p, url in enumerate(row.input_urls)
    ]


def completed(
    request_id: str, ok: int, failed: int = 0, *, at: datetime = T0 + timedelta(minutes=1)
) -> CloudEvent[RequestCompleted]:
    data = RequestCompleted(
        request_id=request_id,
        status="completed" if ok else "error",
        counts=Counts(total=ok + failed, ok=ok, failed=failed),
        completed_at=at,
    )
    return CloudEvent.wrap(data, source="test", id=completed_event_id(request_id))


# Managing requests: rounds, cancel, retry, deletion -----------------------------------


def processed_in_round(
    request_id: str,
    row: int,
    position: int,
    round: int,
    *,
    input_url: str = "http://in/x.jpg",
    ok: bool = True,
    message: str = "HTTP 404",
    at: datetime | None = None,
) -> CloudEvent[ImageProcessed]:
    """`processed`, in retry round `round` (0 is `processed` itself); an ok image of a
    round N > 0 is stored under http://media/<id>/<key>-r<N>.jpg, so rounds show apart."""
    event = processed(request_id, row, position, input_url=input_url, ok=ok, message=message)
    if round:
        key = image_key(row, position)
        url = f"http://media/{request_id}/{key}-r{round}.jpg" if ok else None
        data = event.data.model_copy(update={"round": round, "output_url": url})
        event = CloudEvent.wrap(data, source="test", id=processed_event_id(request_id, key, round))
    event.time = at or T0 + timedelta(minutes=10 * round, seconds=1 + row * 10 + position)
    return event


def completed_in_round(
    request_id: str, round: int, ok: int, failed: int = 0, *, at: datetime | None = None
) -> CloudEvent[RequestCompleted]:
    """`completed` of retry round `round`, with the whole request's counts; by default
    a minute after the round started (T0 + 10 min a round)."""
    data = RequestCompleted(
        request_id=request_id,
        status="completed" if ok else "error",
        counts=Counts(total=ok + failed, ok=ok, failed=failed),
        completed_at=at or T0 + timedelta(minutes=10 * round + 1),
        round=round,
    )
    return CloudEvent.wrap(data, source="test", id=completed_event_id(request_id, round))


def in_round(event: CloudEvent, round: int) -> CloudEvent:
    """An ImageProcessed or RequestCompleted of retry round `round` (its id as the
    processor gives it, suffixed `:rN`); the event itself is left as it was."""
    data = event.data.model_copy(update={"round": round})
    if isinstance(data, ImageProcessed):
        event_id = processed_event_id(data.request_id, data.image_key, round)
    elif isinstance(data, RequestCompleted):
        event_id = completed_event_id(data.request_id, round)
    else:
        raise TypeError(f"{type(data).__name__} has no round of its own")
    return event.model_copy(update={"data": data, "id": event_id})


def cancelled(
    request_id: str,
    total: int,
    ok: int = 0,
    failed: int = 0,
    *,
    round: int = 0,
    at: datetime = T0 + timedelta(seconds=30),
) -> CloudEvent[RequestCancelled]:
    data = RequestCancelled(
        request_id=request_id,
        counts=Counts(total=total, ok=ok, failed=failed),
        cancelled_at=at,
        round=round,
    )
    return CloudEvent.wrap(data, source="test", id=cancelled_event_id(request_id))


def retry_started(
    request_id: str, round: int, image_keys: Sequence[str], *, at: datetime | None = None
) -> CloudEvent[RetryStarted]:
    """The failed `image_keys` run again in `round`; by default at T0 + 10 min a round."""
    data = RetryStarted(
        request_id=request_id,
        round=round,
        image_keys=list(image_keys),
        started_at=at or T0 + timedelta(minutes=10 * round),
    )
    return CloudEvent.wrap(data, source="test", id=retry_started_event_id(request_id, round))


def deleted(
    request_id: str, *, at: datetime = T0 + timedelta(hours=2)
) -> CloudEvent[RequestDeleted]:
    data = RequestDeleted(request_id=request_id, deleted_at=at)
    return CloudEvent.wrap(data, source="test", id=deleted_event_id(request_id))
