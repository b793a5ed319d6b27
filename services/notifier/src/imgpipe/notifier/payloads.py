"""The JSON bodies the webhooks carry, built from what the notifier stored."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from imgpipe.contracts.settings import Settings
from imgpipe.notifier.webhooks import PROCESSING, RECEIVED

Doc = dict[str, Any]


def iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


def dumps(payload: Doc) -> str:
    """Compact JSON; the exact text is stored so every retry sends the same bytes."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)


def output_csv_url(settings: Settings, request_id: str) -> str:
    base = settings.public_base_url or f"http://127.0.0.1:{settings.status_port}"
    return f"{base.rstrip('/')}/status/{request_id}/output.csv"


def _payload(event_type: str, request: Doc, counts: Doc, at: datetime) -> Doc:
    return {
        "type": event_type,
        "request_id": request["_id"],
        "status": event_type.removeprefix("request."),
        "counts": counts,
        "timestamp": iso(at),
    }


def received(request: Doc) -> Doc:
    counts = {"total": request["image_count"], "ok": 0, "failed": 0}
    return _payload(RECEIVED, request, counts, request["received_at"])


def processing(request: Doc, ok: int, failed: int) -> Doc:
    counts = {"total": request["image_count"], "ok": ok, "failed": failed}
    at = request.get("first_processed_at") or request["completed"]["completed_at"]
    return _payload(PROCESSING, request, counts, at)


def final(
    event_type: str,
    request: Doc,
    products: list[Doc] | None,
    settings: Settings,
) -> Doc:
    completed = request["completed"]
    payload = _payload(event_type, request, completed["counts"], completed["completed_at"])
    payload["products"] = products
    payload["output_csv_url"] = output_csv_url(settings, request["_id"])
    return payload


def products(rows: list[Doc], images: list[Doc]) -> list[Doc]:
    """Rows in input order; output URLs, errors and download attempts aligned with the
    input URLs."""
    by_key = {image["key"]: image for image in images}
    result = []
    for row_index, row in enumerate(rows):
        outputs: list[str | None] = []
        errors: list[Doc | None] = []
        attempts: list[int | None] = []
        for position in range(len(row["input_urls"])):
            image = by_key.get(f"{row_index}-{position}") or {}
            ok = image.get("outcome") == "ok"
            outputs.append(image.get("output_url") if ok else None)
            errors.append(image.get("error") if image.get("outcome") == "failed" else None)
            attempts.append(image.get("attempts"))
        result.append(
            {
                "serial_number": row["serial_number"],
                "product_name": row["product_name"],
                "input_urls": row["input_urls"],
                "output_urls": outputs,
                "errors": errors,
                "attempts": attempts,
            }
        )
    return result
