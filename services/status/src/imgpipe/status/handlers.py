"""Event -> read-model update. Every update is idempotent and commutes with the others.

The read model keeps, per request, one document for what RequestReceived,
RequestCompleted, RequestCancelled and RetryStarted carry (`_id` = request id) and the
image outcomes in small page documents, one per `ROWS_PER_PAGE` rows
(`adapters/repository.py`). Each event only `$set`s the fields it owns and `$max`es
`updated_at` (and the request's `phase`, for the list's status filter), so duplicates
change nothing and any delivery order converges on the same documents. Updates upsert:
an ImageProcessed that overtakes its RequestReceived is kept.

Rounds (retries of a request's failed images) never overwrite each other: each round's
events go to paths of their own, and the views pick the highest round (`views.py`).

| event | document | path |
|---|---|---|
| RequestReceived | request; every page | `received`, `total`, `options`, ...; `rows` |
| ImageProcessed, round 0 | page | `images.<key>` |
| ImageProcessed, round N | page | `rounds.r<N>.<key>` |
| ImageProcessed's tally, round N | request | `tallies.r<N>.<field>` (`$max`) |
| RequestCompleted, round 0 | request | `final_status`, `final_counts`, `completed_at` |
| RequestCompleted, round N | request | `finals.r<N>` (`status`, `counts`, `completed_at`) |
| RequestCancelled, round N | request | `cancelled.r<N>` (`counts`, `cancelled_at`) |
| RetryStarted, round N | request | `retries.r<N>` (`image_keys`, `started_at`) |

Round 0 keeps the paths it had before rounds existed. RequestDeleted is no `$set`: it
deletes the request's documents and leaves a tombstone (`Change.delete`).

A retry makes a finished request `processing` again: RetryStarted `$set`s the phase
(the one move back, ordered by the processor, which starts a round only after the
previous one ended); within a round the phase only moves forward.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from imgpipe.contracts.events import (
    AnyEvent,
    ImageProcessed,
    RequestCancelled,
    RequestCompleted,
    RequestDeleted,
    RequestReceived,
    RetryStarted,
    image_key,
)
from imgpipe.contracts.recent import RecentIds
from imgpipe.contracts.tracing import trace_id_of

# Rows per image page. The database rewrites a whole document on every update, so a page
# must stay small whatever the request's size. Measured on SecantusDB with 3 images a row:
# 20 rows write for ~25% less CPU than 50; fewer rows add pages to read for little gain.
ROWS_PER_PAGE = 20

# The request document's `phase`, which `GET /requests?status=` filters on through an
# index. A request only moves forward, so it is `$max`ed: the rank prefix makes the
# strings sort in lifecycle order, and a late RequestReceived cannot move a finished
# request back. (The status answer itself still derives the status from the outcomes.)
PHASES = {
    "received": "0-received",
    "processing": "1-processing",
    "completed": "2-completed",
    "error": "2-error",
    "cancelled": "2-cancelled",
}


@dataclass(frozen=True)
class Change:
    """One event's effect on a document: fields to `$set`, a time to `$max`.
    `page`: the request's image page it goes to, None for the request's own document.
    `urgent`: a reader is waiting for it (the request appears, or is final), so the
    batch writer writes it without resting.
    `delete`: the request was deleted; `fields` is empty and `at` the time of deletion.
    `phase`: the request document's phase moves to at least this (a `PHASES` value),
    whatever document the change itself goes to; with `phase_reset`, to exactly this
    (a retry reopening a finished request).
    `row_pages`: RequestReceived's rows, `ROWS_PER_PAGE` per image page (`$set` as the
    page's `rows`), so that a page of products reads small documents only.
    `maxes`: paths of the request document raised to at least these values (an
    ImageProcessed's tally), whatever document the change itself goes to."""

    request_id: str
    fields: dict[str, Any]
    at: datetime
    urgent: bool = False
    page: int | None = None
    delete: bool = False
    phase: str | None = None
    phase_reset: bool = False
    row_pages: dict[int, list[dict[str, Any]]] | None = None
    maxes: dict[str, int] | None = None


Submit = Callable[[Change], Awaitable[None]]


def change_for(event: AnyEvent) -> Change:
    data = event.data
    if isinstance(data, RequestReceived):
        received = {**_received_fields(data), "trace_id": trace_id_of(event.traceparent)}
        return Change(
            data.request_id,
            received,
            data.received_at,
            urgent=True,
            phase=PHASES["received"],
            row_pages=_row_pages(data),
        )
    if isinstance(data, ImageProcessed):
        # Build the key from the integers, never from the event's string: a "." or "$"
        # in a field path would address something else.
        key = image_key(data.row_index, data.position)
        path = f"images.{key}" if data.round == 0 else f"{round_path('rounds', data.round)}.{key}"
        fields: dict[str, Any] = {path: _image_fields(data)}
        tally = data.tally.model_dump() if data.tally is not None else {}
        maxes = {f"{round_path('tallies', data.round)}.{name}": n for name, n in tally.items()}
        page = data.row_index // ROWS_PER_PAGE
        return Change(data.request_id, fields, event.time, page=page, maxes=maxes or None)
    if isinstance(data, RequestCompleted):
        counts = data.counts.model_dump()
        completed: dict[str, Any] = (
            {"final_status": data.status, "final_counts": counts, "completed_at": data.completed_at}
            if data.round == 0
            else {
                round_path("finals", data.round): {
                    "status": data.status,
                    "counts": counts,
                    "completed_at": data.completed_at,
                }
            }
        )
        return Change(
            data.request_id,
            completed,
            data.completed_at,
            urgent=True,
            phase=PHASES[data.status],
        )
    if isinstance(data, RequestCancelled):
        cancelled = {"counts": data.counts.model_dump(), "cancelled_at": data.cancelled_at}
        fields = {round_path("cancelled", data.round): cancelled}
        return Change(
            data.request_id,
            fields,
            data.cancelled_at,
            urgent=True,
            phase=PHASES["cancelled"],
        )
    if isinstance(data, RetryStarted):
        retry = {"image_keys": list(data.image_keys), "started_at": data.started_at}
        fields = {round_path("retries", data.round): retry}
        return Change(
            data.request_id,
            fields,
            data.started_at,
            urgent=True,
            phase=PHASES["processing"],
            phase_reset=True,
        )
    if isinstance(data, RequestDeleted):
        return Change(data.request_id, {}, data.deleted_at, urgent=True, delete=True)
    raise TypeError(f"no read-model update for {type(data).__name__}")


async def handle_event(event: AnyEvent, submit: Submit, started: RecentIds | None = None) -> None:
    """Store the event's effect; returns once it is written (the bus acks after that).

    `started` remembers requests whose first outcome this process has written: that one
    moves a request to `processing`, a change readers wait for, so it is urgent, and
    it moves the request document's phase too (only the first: the request document
    may be large, and rewriting it for every outcome is what pages avoid). Without
    `started` every outcome moves the phase, which is right but costs more."""
    change = change_for(event)
    first = change.page is not None and (started is None or change.request_id not in started)
    if first:
        change = replace(change, urgent=True, phase=PHASES["processing"])
    await submit(change)
    if first and started is not None:
        # Only once written: a failed write is redelivered, and must move the phase then.
        started.add(change.request_id)


def round_path(field: str, round: int) -> str:
    """`<field>.r<N>`: built from the integer, so never a path of something else."""
    return f"{field}.r{int(round)}"


def _received_fields(data: RequestReceived) -> dict[str, Any]:
    # The rows go to the image pages (`_row_pages`), not here: a 100,000-row request's
    # rows are megabytes, which every read of the request document would carry
    # (SecantusDB: ~16 us a row, whatever the projection). Documents written before
    # keep them under `rows` (no `rows_in_pages`), and the reads take them from there.
    return {
        "received": True,
        "rows_in_pages": True,
        "total": data.image_count,
        "options": data.options.model_dump(),
        "product_count": len(data.rows),  # for the list, which does not read the rows
        "created_at": data.received_at,
    }


def _row_pages(data: RequestReceived) -> dict[int, list[dict[str, Any]]]:
    rows = [row.model_dump() for row in data.rows]
    return {
        start // ROWS_PER_PAGE: rows[start : start + ROWS_PER_PAGE]
        for start in range(0, len(rows), ROWS_PER_PAGE)
    }


def _image_fields(data: ImageProcessed) -> dict[str, Any]:
    # `reused` only when set: most images are made anew, and pages hold thousands.
    reused = {"reused": data.reused} if data.reused else {}
    return {
        "outcome": data.outcome,
        "output_url": data.output_url,
        "error": data.error.model_dump() if data.error else None,
        "bytes_in": data.bytes_in,
        "bytes_out": data.bytes_out,
        "width": data.width,
        "height": data.height,
        "format": data.format,
        "attempts": data.attempts,
        **reused,
    }
