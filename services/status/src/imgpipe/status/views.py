"""Read-model document -> what users see. Pure functions over one document, no queries."""

from __future__ import annotations

import csv
import io
from typing import Any

from imgpipe.contracts.events import image_key
from imgpipe.status.schemas import Progress, StatusResponse

CSV_HEADER = ("S. No.", "Product Name", "Input Image Urls", "Output Image Urls")
# Spreadsheet apps run cells starting with these as formulas (OWASP "CSV Injection").
_FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def is_visible(doc: dict[str, Any] | None) -> bool:
    """A request is shown only once its RequestReceived arrived.

    Image outcomes may overtake it (they are stored meanwhile), but without the rows we
    can neither list products nor know the total, so until then the id answers 404 — the
    same answer a client gets in the moment between upload and the first event.
    """
    return doc is not None and bool(doc.get("received"))


def status_view(doc: dict[str, Any]) -> StatusResponse:
    images: dict[str, dict[str, Any]] = doc.get("images") or {}
    progress = _progress(doc, images)
    status = _status(doc, images)
    products = []
    for row_index, row in enumerate(doc["rows"]):
        outputs: list[str | None] = []
        errors: list[dict[str, Any] | None] = []
        for position in range(len(row["input_urls"])):
            image = images.get(image_key(row_index, position)) or {}
            outputs.append(image.get("output_url") if image.get("outcome") == "ok" else None)
            errors.append(image.get("error") if image.get("outcome") == "failed" else None)
        products.append({**row, "output_urls": outputs, "errors": errors})
    # model_validate on plain dicts runs in pydantic-core: cheap even for 1,000 images.
    return StatusResponse.model_validate(
        {
            "request_id": doc["_id"],
            "status": status,
            "progress": progress,
            "products": products,
            "error_message": _error_message(status, progress),
            "created_at": doc["created_at"],
            "updated_at": doc.get("updated_at") or doc["created_at"],
        }
    )


def output_csv(view: StatusResponse) -> str:
    """The seed's output format; a failed or pending image leaves its place empty.

    Output URLs stay aligned with the input URLs ("url1,,url3"), so a reader can zip the
    two cells. Written with what is known so far: a request still processing gets a
    partial file rather than an error (the response header says which state it is in).
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(CSV_HEADER)
    for product in view.products:
        cells = (
            product.serial_number,
            product.product_name,
            ",".join(product.input_urls),
            ",".join(url or "" for url in product.output_urls),
        )
        writer.writerow([neutralise_formula(cell) for cell in cells])
    return buffer.getvalue()


def neutralise_formula(cell: str) -> str:
    """Prefix a single quote so spreadsheets show the cell as text (OWASP advice)."""
    return "'" + cell if cell.startswith(_FORMULA_PREFIXES) else cell


def _status(doc: dict[str, Any], images: dict[str, Any]) -> str:
    if doc.get("final_status"):
        return doc["final_status"]
    return "processing" if images else "received"


def _progress(doc: dict[str, Any], images: dict[str, dict[str, Any]]) -> Progress:
    # Once RequestCompleted arrived its counts are the processor's final tally; they win
    # over the map, which may still miss an ImageProcessed that the completion overtook.
    if final := doc.get("final_counts"):
        return Progress.model_validate(final)
    ok = sum(1 for image in images.values() if image.get("outcome") == "ok")
    failed = len(images) - ok
    return Progress(total=doc.get("total", len(images)), ok=ok, failed=failed)


def _error_message(status: str, progress: Progress) -> str | None:
    if status == "error":
        return f"no image could be processed ({progress.failed} of {progress.total} failed)"
    if status == "completed" and progress.failed:
        return f"{progress.failed} of {progress.total} images failed"
    return None
