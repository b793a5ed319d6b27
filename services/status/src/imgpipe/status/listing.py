"""`GET /requests`: pages of the request list and their cursors.

A cursor is the position where a page ended (the last request's creation time, to the
millisecond as the database keeps it, and its id), as base64url JSON. It is opaque to
clients: only this module makes and reads it, so its shape may change.
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import UTC, datetime, timedelta
from typing import Any

from imgpipe.status.adapters.repository import Position, StatusRepository
from imgpipe.status.handlers import PHASES
from imgpipe.status.views import list_item, running_tally

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MILLISECOND = timedelta(milliseconds=1)
MAX_CURSOR_CHARS = 512  # a real one is under 100; a longer one is not worth decoding


class BadCursor(ValueError):
    """`before` is not a cursor this API handed out."""


def encode_cursor(position: Position) -> str:
    # Whole milliseconds (BSON's precision): an exact integer, no float rounding.
    millis = (position.created_at - EPOCH) // MILLISECOND
    raw = json.dumps({"t": millis, "id": position.request_id}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> Position:
    if len(cursor) > MAX_CURSOR_CHARS:
        raise BadCursor("too long")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        fields: Any = json.loads(raw)
    except (binascii.Error, ValueError) as exc:
        raise BadCursor("not base64url JSON") from exc
    if not isinstance(fields, dict) or set(fields) != {"t", "id"}:
        raise BadCursor("not a cursor")
    millis, request_id = fields["t"], fields["id"]
    if type(millis) is not int or not isinstance(request_id, str) or not request_id:
        raise BadCursor("not a cursor")
    try:
        return Position(EPOCH + millis * MILLISECOND, request_id)
    except OverflowError as exc:
        raise BadCursor("time out of range") from exc


async def list_page(
    repository: StatusRepository, status: str | None, before: str | None, limit: int
) -> dict[str, Any]:
    """`{"items", "next"}`: up to `limit` requests, newest first, older than `before`.

    One request more than asked is read, so the last page says `next: null` rather than
    leading to an empty one."""
    position = None if before is None else decode_cursor(before)
    phase = None if status is None else PHASES[status]
    docs = await repository.list_requests(
        phase, position, limit + 1, counted=lambda doc: running_tally(doc) is not None
    )
    items = [list_item(doc) for doc in docs[:limit]]
    more = len(docs) > limit
    last = docs[limit - 1] if more else None
    cursor = None if last is None else encode_cursor(Position(last["created_at"], last["_id"]))
    return {"items": items, "next": cursor}
