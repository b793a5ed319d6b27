"""The JSON bodies the webhooks carry, built from what the notifier stored."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import NotRequired, TypedDict

from imgpipe.contracts.products import Product
from imgpipe.contracts.products import products as project_products
from imgpipe.contracts.settings import Settings
from imgpipe.notifier.adapters.requests import ImageBytes, ImageDoc, RequestDoc, Row
from imgpipe.notifier.webhooks import PROCESSING, RECEIVED


class Bytes(TypedDict):
    """Sizes of the stored images, each distinct image once: as GET /status/{id} shows them."""

    images: int
    input: int
    output: int
    ratio: float | None  # output / input; None when no image was stored


class Payload(TypedDict):
    type: str
    request_id: str
    status: str
    counts: dict[str, int]  # total, ok, failed
    timestamp: str
    # The final webhook's only:
    products: NotRequired[list[Product] | None]  # None: too many images, see the CSV
    output_csv_url: NotRequired[str]
    bytes: NotRequired[Bytes]


def iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


def dumps(payload: Payload) -> str:
    """Compact JSON; the exact text is stored so every retry sends the same bytes."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)


def output_csv_url(settings: Settings, request_id: str) -> str:
    return f"{settings.status_base_url}/status/{request_id}/output.csv"


def _payload(event_type: str, request: RequestDoc, counts: dict[str, int], at: datetime) -> Payload:
    return {
        "type": event_type,
        "request_id": request["_id"],
        "status": event_type.removeprefix("request."),
        "counts": counts,
        "timestamp": iso(at),
    }


def received(request: RequestDoc) -> Payload:
    counts = {"total": request["image_count"], "ok": 0, "failed": 0}
    return _payload(RECEIVED, request, counts, request["received_at"])


def processing(request: RequestDoc, ok: int, failed: int) -> Payload:
    counts = {"total": request["image_count"], "ok": ok, "failed": failed}
    at = request.get("first_processed_at") or request["completed"]["completed_at"]
    return _payload(PROCESSING, request, counts, at)


def final(
    event_type: str,
    request: RequestDoc,
    products: list[Product] | None,
    sizes: Bytes,
    settings: Settings,
) -> Payload:
    completed = request["completed"]
    payload = _payload(event_type, request, completed["counts"], completed["completed_at"])
    payload["products"] = products
    payload["output_csv_url"] = output_csv_url(settings, request["_id"])
    payload["bytes"] = sizes
    return payload


def byte_totals(images: list[ImageBytes]) -> Bytes:
    """Bytes in and out, computed as the status service does (status.views._bytes): a URL
    in several cells is one image, downloaded and stored once, so it counts once (by its
    output URL)."""
    stored = {image["output_url"]: image for image in images if image["output_url"]}
    bytes_in = sum(image.get("bytes_in") or 0 for image in stored.values())
    bytes_out = sum(image.get("bytes_out") or 0 for image in stored.values())
    ratio = round(bytes_out / bytes_in, 4) if bytes_in else None
    return {"images": len(stored), "input": bytes_in, "output": bytes_out, "ratio": ratio}


def products(rows: list[Row], images: list[ImageDoc]) -> list[Product]:
    """The products as the status answer shows them (contracts.products)."""
    by_key = {image["key"]: image for image in images}
    return project_products(rows, by_key.get)
