"""Read-model document -> what users see. Pure functions, no queries, over one document:
the request's, with the outcomes from its image pages merged in under `images`
(`StatusRepository.get`, or `StatusRepository.rows_page` for a page of products).

An answer is a `Summary` (status, progress, totals: from the whole request) and one page
of products (rows `start` to `start + limit`), with a cursor for the next page. The
first page at the default limit, 1,000 products, is the whole answer of every request up
to that size, as it was before pages.

The answer is built as plain dicts in the shape of `schemas.StatusResponse` and serialised
once, in pydantic-core, without validating it again: the document was built from
validated events, and a test holds the output to the schema. A `Rendered` answer is what
the read cache keeps: the JSON bytes, their ETag, and the CSV made from them on demand.
"""

from __future__ import annotations

import base64
import binascii
import csv
import gzip
import hashlib
import io
import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import pydantic_core

from imgpipe.contracts.events import Options
from imgpipe.contracts.products import (
    ByteTally,
    ByteTotals,
    Outcome,
    Product,
    ReusedCount,
    products,
    reused_totals,
    stored_totals,
)

CSV_HEADER = ("S. No.", "Product Name", "Input Image Urls", "Output Image Urls")
FINAL_STATUSES = frozenset({"completed", "error", "cancelled"})
GZIP_LEVEL = 6  # level 9 takes four times as long for 1% less
GZIP_MIN_BYTES = 1024  # below this the headers outweigh the saving
# Spreadsheet apps run cells starting with these as formulas (OWASP "CSV Injection").
_FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
# Products per answer unless `limit` says otherwise: every request up to this size gets
# its whole answer in one page, as before pages existed. Also the most a page may hold.
DEFAULT_LIMIT = 1000
MAX_LIMIT = 1000
MAX_CURSOR_CHARS = 64  # a real one is under 20


class BadCursor(ValueError):
    """`after` is not a cursor this API handed out."""


@dataclass(frozen=True)
class Summary:
    """What an answer says of the whole request, whichever page of products it carries:
    the fields before and after `products`, in `StatusResponse` order."""

    head: dict[str, Any]  # request_id, status, round, progress, options, bytes
    tail: dict[str, Any]  # error_message, created_at, updated_at, trace_id
    products_total: int
    settled: bool

    @property
    def status(self) -> str:
        return str(self.head["status"])


@dataclass(frozen=True, eq=False)
class Rendered:
    """One request's answer, serialised once and served many times."""

    body: bytes  # the JSON answer of GET /status/{id}: its first page of products
    status: str
    settled: bool  # final status and every image's outcome known: the answer cannot change
    gzipped: bytes | None = None  # the body gzip-encoded, for clients that accept it
    # What the answer says of the whole request: other pages are built on it.
    summary: Summary | None = field(default=None, compare=False)

    @classmethod
    def of(
        cls, body: bytes, status: str, settled: bool, summary: Summary | None = None
    ) -> Rendered:
        # Compressed once here rather than per response: about 12x smaller for large
        # answers (repetitive URLs), so less to send and for a client to read.
        gzipped = gzip.compress(body, GZIP_LEVEL, mtime=0) if len(body) >= GZIP_MIN_BYTES else None
        return cls(body, status, settled, gzipped, summary)

    @property
    def whole(self) -> bool:
        """Whether the body holds every product (then the CSV is made from it)."""
        return self.summary is None or self.summary.products_total <= DEFAULT_LIMIT

    @cached_property
    def etag(self) -> str:
        return _etag(self.body)

    @cached_property
    def csv(self) -> bytes:
        """The output CSV, made from the JSON answer the first time it is asked for
        (only when the answer is `whole`: a larger request's CSV is streamed)."""
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


def render(doc: dict[str, Any], counted: Counted | None = None) -> Rendered:
    """The first page at the default limit, from the whole document (`repository.get`),
    or, given what was `counted` of the whole request, from the first page's rows and
    outcomes alone."""
    summary = summarise(doc, counted)
    body = page_body(summary, doc["rows"][:DEFAULT_LIMIT], 0, shown_images(doc), DEFAULT_LIMIT)
    return Rendered.of(pydantic_core.to_json(body), summary.status, summary.settled, summary)


@dataclass(frozen=True)
class Counted:
    """What a summary tells of a request's outcomes: counted from the outcomes themselves
    (`OutcomeCount`, exact) or taken from the processor's running tally (`tallied`)."""

    ok: int
    failed: int
    bytes: ByteTotals
    reused: ReusedCount
    exact: bool = True

    @property
    def known(self) -> int:
        return self.ok + self.failed


class OutcomeCount:
    """Counts shown outcomes a batch at a time, so that a request of any size is counted
    without holding all its outcomes (a page of them at a time)."""

    def __init__(self) -> None:
        self._bytes = ByteTally()
        self._counts: Counter[str] = Counter()

    def add(self, images: Iterable[Outcome]) -> None:
        for image in images:
            outcome = "ok" if image.get("outcome") == "ok" else "failed"
            self._counts[outcome] += 1
            if outcome == "ok" and image.get("reused"):
                self._counts[str(image["reused"])] += 1
            self._bytes.add(image)

    def counted(self) -> Counted:
        reused = reused_totals(self._counts["not_modified"], self._counts["same_bytes"])
        return Counted(self._counts["ok"], self._counts["failed"], self._bytes.totals(), reused)


def count_outcomes(images: Iterable[Outcome]) -> Counted:
    count = OutcomeCount()
    count.add(images)
    return count.counted()


def tallied(tally: Mapping[str, int]) -> Counted:
    """A `running_tally` as what is counted: bytes and reuse as the processor counted
    them (each image URL once), never exact."""

    def field(name: str) -> int:
        return int(tally.get(name, 0))

    totals = stored_totals(field("stored"), field("bytes_in"), field("bytes_out"))
    reused = reused_totals(field("not_modified"), field("same_bytes"))
    return Counted(field("ok"), field("failed"), totals, reused, exact=False)


def running_tally(doc: dict[str, Any]) -> dict[str, int] | None:
    """The processor's running tally (events.Tally) of a large request still running,
    from its request document alone; None when its answer is to count every outcome.

    A request of more products than one page (`is_large`), neither final nor
    cancelled, whose current round has a tally: its progress, bytes and reuse come
    from the tally, and only its first page of outcomes is read, so a poll costs the
    same at 100,000 images as at 1,000. Every other answer counts the outcomes: a
    final one is exact (and kept long once settled)."""
    if not is_large(doc):
        return None
    run = current_run(doc)
    if run.completion is not None or run.cancelled is not None:
        return None
    tally: dict[str, int] | None = rounds_of(doc, "tallies").get(run.round)
    return tally


def is_large(doc: dict[str, Any]) -> bool:
    """More products than the first page holds, rows kept in the image pages: its
    outcomes are counted a page at a time, never read all together."""
    return bool(doc.get("rows_in_pages")) and int(doc.get("product_count") or 0) > DEFAULT_LIMIT


def render_page(
    summary: Summary, rows: list[dict[str, Any]], start: int, doc: dict[str, Any], limit: int
) -> Rendered:
    """Another page: `rows` from `start`, their outcomes in `doc` (`repository.rows_page`)."""
    body = page_body(summary, rows, start, shown_images(doc), limit)
    return Rendered.of(pydantic_core.to_json(body), summary.status, summary.settled, summary)


def page_products(rows: list[dict[str, Any]], start: int, doc: dict[str, Any]) -> list[Product]:
    """The products of `rows` (from index `start`), their outcomes in `doc`."""
    return products(rows, shown_images(doc).get, start, with_reused=True)


def status_body(doc: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The first page's answer as dicts, and whether it is settled (see `summarise`)."""
    summary = summarise(doc)
    body = page_body(summary, doc["rows"][:DEFAULT_LIMIT], 0, shown_images(doc), DEFAULT_LIMIT)
    return body, summary.settled


def summarise(doc: dict[str, Any], counted: Counted | None = None) -> Summary:
    """Status, progress and totals of the whole request, and whether it is settled.

    `counted`: what is known of the whole request's outcomes when `doc` holds the first
    page's rows and outcomes only (its `product_count` is then the number of products);
    None to count them in `doc`.

    Settled: final, every image's outcome known, and none failed, as counted exactly.
    A failed image may still be retried (RetryStarted reopens the request), and another
    instance's write drops nothing from this instance's cache, so such an answer is
    kept only the short TTL, like one still changing."""
    products_total = len(doc["rows"]) if counted is None else int(doc["product_count"])
    if counted is None:
        counted = count_outcomes(shown_images(doc).values())
    run = current_run(doc)
    status = _status(run, counted)
    progress = _progress(doc, run, counted)
    settled = (
        counted.exact
        and status in FINAL_STATUSES
        and counted.known >= int(doc.get("total", counted.known))
        and counted.failed == 0
    )
    head = {
        "request_id": doc["_id"],
        "status": status,
        "round": run.round,
        "progress": progress,
        "options": doc.get("options") or Options().model_dump(),
        "bytes": counted.bytes,
        "reused": counted.reused,
    }
    tail = {
        "error_message": _error_message(status, progress),
        "created_at": doc["created_at"],
        "updated_at": doc.get("updated_at") or doc["created_at"],
        "trace_id": doc.get("trace_id"),
    }
    return Summary(head, tail, products_total, settled)


def page_body(
    summary: Summary,
    rows: list[dict[str, Any]],
    start: int,
    images: Mapping[str, dict[str, Any]],
    limit: int,
) -> dict[str, Any]:
    """The answer (fields in `StatusResponse` order) with the products of `rows`, the
    request's rows from index `start`, and the cursor of the page after them."""
    end = start + len(rows)
    following = encode_cursor(end) if end < summary.products_total else None
    return {
        **summary.head,
        "products": products(rows, images.get, start, with_reused=True),
        "products_total": summary.products_total,
        "limit": limit,
        "next": following,
        **summary.tail,
    }


def encode_cursor(row: int) -> str:
    """The next page's cursor: opaque to clients (only this module reads it)."""
    raw = json.dumps({"row": row}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """The row a cursor of `encode_cursor` starts at; BadCursor for anything else."""
    if len(cursor) > MAX_CURSOR_CHARS:
        raise BadCursor("too long")
    try:
        fields: Any = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (binascii.Error, ValueError) as exc:
        raise BadCursor("not base64url JSON") from exc
    row = fields.get("row") if isinstance(fields, dict) and set(fields) == {"row"} else None
    if type(row) is not int or row < 1:
        raise BadCursor("not a cursor")
    return row


@dataclass(frozen=True)
class Run:
    """The request's latest run: round 0 first, N after the Nth retry. `completion` is
    its RequestCompleted (`status`, `counts`), `cancelled` its RequestCancelled."""

    round: int
    completion: dict[str, Any] | None
    cancelled: dict[str, Any] | None


def rounds_of(doc: dict[str, Any], field: str) -> dict[int, Any]:
    """`{N: value}` of a field stored per round as `<field>.r<N>`."""
    return {int(name[1:]): value for name, value in (doc.get(field) or {}).items()}


def current_run(doc: dict[str, Any]) -> Run:
    """The highest round any event told of. A run's end counts only for the latest run:
    a RequestCompleted of round N-1 delivered after RetryStarted(N) is history."""
    finals, cancels = rounds_of(doc, "finals"), rounds_of(doc, "cancelled")
    latest = max([0, *finals, *cancels, *rounds_of(doc, "retries"), *rounds_of(doc, "rounds")])
    completion = finals.get(latest)
    if latest == 0 and doc.get("final_status"):
        completion = {"status": doc["final_status"], "counts": doc.get("final_counts")}
    return Run(latest, completion, cancels.get(latest))


def shown_images(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each image's outcome of its highest round. An image a retry runs again has none
    (pending) until an outcome of that round arrives."""
    images: dict[str, dict[str, Any]] = dict(doc.get("images") or {})
    round_of: dict[str, int] = {}
    for number, outcomes in sorted(rounds_of(doc, "rounds").items()):
        for key, outcome in outcomes.items():
            images[key] = outcome
            round_of[key] = number
    for number, retry in rounds_of(doc, "retries").items():
        for key in retry.get("image_keys") or ():
            if round_of.get(key, 0) < number:
                images.pop(key, None)
    return images


def list_item(doc: dict[str, Any]) -> dict[str, Any]:
    """One request in `GET /requests` (fields in `RequestSummary` order): its status and
    progress as its status answer gives them, from a document of `list_requests`
    (without outcomes when it has a `running_tally`)."""
    tally, run = running_tally(doc), current_run(doc)
    counted = tallied(tally) if tally else count_outcomes(shown_images(doc).values())
    return {
        "request_id": doc["_id"],
        "status": _status(run, counted),
        "progress": _progress(doc, run, counted),
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
    return csv_lines(body["products"], header=True)


def csv_lines(products: Iterable[Mapping[str, Any]], header: bool = False) -> str:
    """The output CSV's lines for these products (and its header line first)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    if header:
        writer.writerow(CSV_HEADER)
    for product in products:
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


def _status(run: Run, counted: Counted) -> str:
    # A round that both completed and was cancelled (the two crossed) shows completed:
    # every image of it has an outcome.
    if run.completion is not None:
        return str(run.completion["status"])
    if run.cancelled is not None:
        return "cancelled"
    return "processing" if counted.known or run.round else "received"


def _progress(doc: dict[str, Any], run: Run, counted: Counted) -> dict[str, int]:
    # Once RequestCompleted arrived its counts are the processor's final tally; they win
    # over the outcomes, which may still miss an ImageProcessed the completion overtook.
    # A retry's counts win only if they tally the whole request. A cancel's counts are
    # what was known when it stopped: images finishing later count, so outcomes decide.
    total = int(doc.get("total", counted.known))
    final = run.completion["counts"] if run.completion is not None else None
    if final and (run.round == 0 or int(final["total"]) == total):
        return {name: int(final[name]) for name in ("total", "ok", "failed")}
    return {"total": total, "ok": counted.ok, "failed": counted.failed}


def _error_message(status: str, progress: dict[str, int]) -> str | None:
    total, failed = progress["total"], progress["failed"]
    if status == "error":
        return f"no image could be processed ({failed} of {total} failed)"
    if status == "completed" and failed:
        return f"{failed} of {total} images failed"
    if status == "cancelled":
        unprocessed = total - progress["ok"] - failed
        parts = [f"{unprocessed} of {total} images not processed"] if unprocessed else []
        parts += [f"{failed} of {total} failed"] if failed else []
        return "cancelled" + (": " + ", ".join(parts) if parts else "")
    return None
