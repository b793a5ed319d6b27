"""Read-model document -> what users see. Pure functions, no queries, over one document:
the request's, with the outcomes from its image pages merged in under `images`
(`StatusRepository.get`).

The answer is built as plain dicts in the shape of `schemas.StatusResponse` and serialised
once, in pydantic-core, without validating it again: the document was built from
validated events, and a test holds the output to the schema. A `Rendered` answer is what
the read cache keeps: the JSON bytes, their ETag, and the CSV made from them on demand.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import pydantic_core

from imgpipe.contracts.events import Options, image_key
from imgpipe.contracts.products import byte_totals, products

CSV_HEADER = ("S. No.", "Product Name", "Input Image Urls", "Output Image Urls")
FINAL_STATUSES = frozenset({"completed", "error"})
GZIP_LEVEL = 6  # level 9 takes four times as long for 1% less
GZIP_MIN_BYTES = 1024  # below this the headers outweigh the saving
# Spreadsheet apps run cells starting with these as formulas (OWASP "CSV Injection").
_FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


@dataclass(frozen=True, eq=False)
class Rendered:
    """One request's answer, serialised once and served many times."""

    body: bytes  # the JSON answer of GET /status/{id}
    status: str
    settled: bool  # final status and every image's outcome known: the answer cannot change
    gzipped: bytes | None = None  # the body gzip-encoded, for clients that accept it

    @classmethod
    def of(cls, body: bytes, status: str, settled: bool) -> Rendered:
        # Compressed once here rather than per response: about 12x smaller for large
        # answers (repetitive URLs), so less to send and for a client to read.
        gzipped = gzip.compress(body, GZIP_LEVEL, mtime=0) if len(body) >= GZIP_MIN_BYTES else None
        return cls(body, status, settled, gzipped)

    @cached_property
    def etag(self) -> str:
        return _etag(self.body)

    @cached_property
    def csv(self) -> bytes:
        """The output CSV, made from the JSON answer the first time it is asked for."""
        return output_csv(pydantic_core.from_json(self.body)).encode()

    @cached_property
    def csv_etag(self) -> str:
        return _etag(self.csv)

    @cached_property
    def gzip_etag(self) -> str:
        # A different representation needs a different strong tag (RFC 9110, 8.8.3).
        return self.etag[:-1] + '-gz"'

    @property
    def nbytes(self) -> int:
        """Memory charged to the cache. The CSV, made later, is never larger than the
        JSON it comes from (the same names and URLs, less around them): charged as such."""
        return 2 * len(self.body) + len(self.gzipped or b"") + 256


def is_visible(doc: dict[str, Any] | None) -> bool:
    """A request is shown only once its RequestReceived arrived.

    Image outcomes may overtake it (they are stored meanwhile), but without the rows we
    can neither list products nor know the total, so until then the id answers 404 — the
    same answer a client gets in the moment between upload and the first event.
    """
    return doc is not None and bool(doc.get("received"))


def render(doc: dict[str, Any]) -> Rendered:
    body, settled = status_body(doc)
    return Rendered.of(pydantic_core.to_json(body), body["status"], settled)


def status_body(doc: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The answer as dicts (fields in `StatusResponse` order), and whether it is settled."""
    images: dict[str, dict[str, Any]] = doc.get("images") or {}
    progress = _progress(doc, images)
    status = _status(doc, images)
    rows = doc["rows"]
    places = [image_key(r, p) for r, row in enumerate(rows) for p in range(len(row["input_urls"]))]
    settled = status in FINAL_STATUSES and all(key in images for key in places)
    body = {
        "request_id": doc["_id"],
        "status": status,
        "progress": progress,
        "options": doc.get("options") or Options().model_dump(),
        "bytes": byte_totals(images.values()),
        "products": products(rows, images.get),
        "error_message": _error_message(status, progress),
        "created_at": doc["created_at"],
        "updated_at": doc.get("updated_at") or doc["created_at"],
    }
    return body, settled


def list_item(doc: dict[str, Any]) -> dict[str, Any]:
    """One request in `GET /requests` (fields in `RequestSummary` order): its status and
    progress as its status answer gives them, from a document of `list_requests`."""
    images: dict[str, dict[str, Any]] = doc.get("images") or {}
    return {
        "request_id": doc["_id"],
        "status": _status(doc, images),
        "progress": _progress(doc, images),
        "created_at": doc["created_at"],
        "updated_at": doc.get("updated_at") or doc["created_at"],
        "product_count": doc["product_count"],
    }


def output_csv(body: dict[str, Any]) -> str:
    """The seed's output format; a failed or pending image leaves its place empty.

    Output URLs stay aligned with the input URLs ("url1,,url3"), so a reader can zip the
    two cells. Written with what is known so far: a request still processing gets a
    partial file rather than an error (the response header says which state it is in).
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(CSV_HEADER)
    for product in body["products"]:
        cells = (
            product["serial_number"],
            product["product_name"],
            ",".join(product["input_urls"]),
            ",".join(url or "" for url in product["output_urls"]),
        )
        writer.writerow([neutralise_formula(cell) for cell in cells])
    return buffer.getvalue()


def neutralise_formula(cell: str) -> str:
    """Prefix a single quote so spreadsheets show the cell as text (OWASP advice)."""
    return "'" + cell if cell.startswith(_FORMULA_PREFIXES) else cell


def _etag(data: bytes) -> str:
    # Strong validator: the same bytes always get the same tag, on every instance.
    return '"' + hashlib.blake2b(data, digest_size=16).hexdigest() + '"'


def _status(doc: dict[str, Any], images: dict[str, Any]) -> str:
    if doc.get("final_status"):
        return doc["final_status"]
    return "processing" if images else "received"


def _progress(doc: dict[str, Any], images: dict[str, dict[str, Any]]) -> dict[str, int]:
    # Once RequestCompleted arrived its counts are the processor's final tally; they win
    # over the map, which may still miss an ImageProcessed that the completion overtook.
    if final := doc.get("final_counts"):
        return {name: int(final[name]) for name in ("total", "ok", "failed")}
    ok = sum(1 for image in images.values() if image.get("outcome") == "ok")
    failed = len(images) - ok
    return {"total": int(doc.get("total", len(images))), "ok": ok, "failed": failed}


def _error_message(status: str, progress: dict[str, int]) -> str | None:
    if status == "error":
        return f"no image could be processed ({progress['failed']} of {progress['total']} failed)"
    if status == "completed" and progress["failed"]:
        return f"{progress['failed']} of {progress['total']} images failed"
    return None
