"""Event -> read-model update. Every update is idempotent and commutes with the others.

The read model is one document per request (`_id` = request id). Each event only `$set`s
the fields it owns (an image's outcome lives under `images.<key>`) and `$max`es
`updated_at`, so duplicates change nothing and any delivery order converges on the same
document. Updates upsert: an ImageProcessed that overtakes its RequestReceived is kept.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from imgpipe.contracts.events import (
    AnyEvent,
    ImageProcessed,
    RequestCompleted,
    RequestReceived,
    image_key,
)


@dataclass(frozen=True)
class Change:
    """One event's effect on a request's document: fields to `$set`, a time to `$max`.
    `urgent`: a reader is waiting for it (the request appears, or is final), so the
    batch writer writes it without resting."""

    request_id: str
    fields: dict[str, Any]
    at: datetime
    urgent: bool = False


Submit = Callable[[Change], Awaitable[None]]


def change_for(event: AnyEvent) -> Change:
    data = event.data
    if isinstance(data, RequestReceived):
        return Change(data.request_id, _received_fields(data), data.received_at, urgent=True)
    if isinstance(data, ImageProcessed):
        # Build the key from the integers, never from the event's string: a "." or "$"
        # in a field path would address something else.
        key = image_key(data.row_index, data.position)
        return Change(data.request_id, {f"images.{key}": _image_fields(data)}, event.time)
    if isinstance(data, RequestCompleted):
        fields = {
            "final_status": data.status,
            "final_counts": data.counts.model_dump(),
            "completed_at": data.completed_at,
        }
        return Change(data.request_id, fields, data.completed_at, urgent=True)
    raise TypeError(f"no read-model update for {type(data).__name__}")


async def handle_event(event: AnyEvent, submit: Submit) -> None:
    """Store the event's effect; returns once it is written (the bus acks after that)."""
    await submit(change_for(event))


def _received_fields(data: RequestReceived) -> dict[str, Any]:
    return {
        "received": True,
        "rows": [row.model_dump() for row in data.rows],
        "total": data.image_count,
        "created_at": data.received_at,
    }


def _image_fields(data: ImageProcessed) -> dict[str, Any]:
    return {
        "outcome": data.outcome,
        "output_url": data.output_url,
        "error": data.error.model_dump() if data.error else None,
        "bytes_in": data.bytes_in,
        "bytes_out": data.bytes_out,
        "width": data.width,
        "height": data.height,
        "format": data.format,
    }
