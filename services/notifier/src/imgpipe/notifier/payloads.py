"""The JSON bodies the webhooks carry, built from what the notifier stored."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import NotRequired, TypedDict

from imgpipe.contracts.products import ByteTotals, Product
from imgpipe.contracts.products import products as project_products
from imgpipe.contracts.settings import Settings
from imgpipe.notifier.adapters.requests import ImageDoc, RequestDoc, Row
from imgpipe.notifier.webhooks import PROCESSING, RECEIVED


class Payload(TypedDict):
    type: str
    request_id: str
    status: str
    counts: dict[str, int]  # total, ok, failed
    timestamp: str
    round: int  # 0 for the first run, N for the Nth retry of the failed images
    # The final webhook's only. `products` only for requests of up to
    # WEBHOOK_MAX_PRODUCTS_IMAGES images (1,000); a larger one has `products_omitted`
    # instead, and its products are in the output CSV and the status pages.
    products: NotRequired[list[Product]]
    products_omitted: NotRequired[bool]
    output_csv_url: NotRequired[str]
    status_url: NotRequired[str]
    bytes: NotRequired[ByteTotals]


def iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


def dumps(payload: Payload) -> str:
    """Compact JSON; the exact text is stored so every retry sends the same bytes."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)


def status_url(settings: Settings, request_id: str) -> str:
    return f"{settings.status_base_url}/status/{request_id}"


def output_csv_url(settings: Settings, request_id: str) -> str:
    return f"{status_url(settings, request_id)}/output.csv"


def _payload(
    event_type: str, request: RequestDoc, counts: dict[str, int], at: datetime, round: int = 0
) -> Payload:
    return {
        "type": event_type,
        "request_id": request["_id"],
        "status": event_type.removeprefix("request."),
        "counts": counts,
        "timestamp": iso(at),
        "round": round,
    }


def received(request: RequestDoc) -> Payload:
    counts = {"total": request["image_count"], "ok": 0, "failed": 0}
    return _payload(RECEIVED, request, counts, request["received_at"])


def processing(request: RequestDoc, ok: int, failed: int, round: int = 0) -> Payload:
    """Round 0: from the first image outcome. Round N: from RetryStarted, with the
    outcomes known before the retry (its images' new ones replace them)."""
    counts = {"total": request["image_count"], "ok": ok, "failed": failed}
    retry = request.get("retry")
    if round and retry and retry["round"] == round:
        at = retry["started_at"]
    else:
        at = request.get("first_processed_at") or request["completed"]["completed_at"]
    return _payload(PROCESSING, request, counts, at, round)


def final(
    event_type: str,
    request: RequestDoc,
    products: list[Product] | None,
    sizes: ByteTotals,
    settings: Settings,
    round: int = 0,
) -> Payload:
    """request.completed, request.error or request.cancelled: the counts the processor
    gave, the products as stored (a cancelled request's unfinished images are null), or,
    `products` None (a large request), `products_omitted` so that the body stays small:
    the output CSV and the status pages have them."""
    completed = request["completed"]
    payload = _payload(event_type, request, completed["counts"], completed["completed_at"], round)
    if products is None:
        payload["products_omitted"] = True
    else:
        payload["products"] = products
    payload["output_csv_url"] = output_csv_url(settings, request["_id"])
    payload["status_url"] = status_url(settings, request["_id"])
    payload["bytes"] = sizes
    return payload


def products(rows: list[Row], images: list[ImageDoc]) -> list[Product]:
    """The products as the status answer shows them (contracts.products)."""
    by_key = {image["key"]: image for image in images}
    return project_products(rows, by_key.get)
