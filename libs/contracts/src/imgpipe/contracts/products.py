"""A request's products as users see them, in the status answer and the final webhook
alike (docs/architecture.md, "HTTP"): each CSV row with, aligned with its input URLs, the
output URL, the error and the download attempts of each image (None while pending)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, NotRequired, TypedDict

from imgpipe.contracts.events import image_key


class ProductError(TypedDict):
    code: str
    message: str


class Product(TypedDict):
    serial_number: str
    product_name: str
    input_urls: list[str]
    output_urls: list[str | None]
    errors: list[ProductError | None]
    attempts: list[int | None]
    # Whether each image's output was reused ("not_modified", "same_bytes") or made now
    # (None); the status answer has it, webhooks leave it out.
    reused: NotRequired[list[str | None]]


Outcome = Mapping[str, Any]  # an image's stored outcome: outcome, output_url, error, attempts


def products(
    rows: Iterable[Mapping[str, Any]],
    outcome_of: Callable[[str], Outcome | None],
    start: int = 0,
    with_reused: bool = False,
) -> list[Product]:
    """Rows in input order; `outcome_of(image_key)` is what is known of an image.
    `start`: the index of the first row given (a page of a larger request)."""
    result: list[Product] = []
    for row_index, row in enumerate(rows, start=start):
        outputs: list[str | None] = []
        errors: list[ProductError | None] = []
        attempts: list[int | None] = []
        reused: list[str | None] = []
        for position in range(len(row["input_urls"])):
            image = outcome_of(image_key(row_index, position)) or {}
            outcome = image.get("outcome")
            error = image.get("error") if outcome == "failed" else None
            outputs.append(image.get("output_url") if outcome == "ok" else None)
            errors.append({"code": error["code"], "message": error["message"]} if error else None)
            attempts.append(image.get("attempts"))
            reused.append(image.get("reused") if outcome == "ok" else None)
        product: Product = {
            "serial_number": row["serial_number"],
            "product_name": row["product_name"],
            "input_urls": list(row["input_urls"]),
            "output_urls": outputs,
            "errors": errors,
            "attempts": attempts,
        }
        if with_reused:
            product["reused"] = reused
        result.append(product)
    return result


class ReusedCount(TypedDict):
    """Images (each place in the CSV) whose output was reused, in all and by reason."""

    images: int
    not_modified: int
    same_bytes: int


def reused_totals(not_modified: int, same_bytes: int) -> ReusedCount:
    return {
        "images": not_modified + same_bytes,
        "not_modified": not_modified,
        "same_bytes": same_bytes,
    }


class ByteTotals(TypedDict):
    """Sizes of the stored images, each distinct image once."""

    images: int
    input: int
    output: int
    ratio: float | None  # output / input; None when no image was stored


def byte_totals(images: Iterable[Outcome]) -> ByteTotals:
    """Bytes in and out of the images stored so far, as the status answer and the final
    webhook show them. A URL in several cells is one image, downloaded and stored once:
    it counts once (by its output URL)."""
    tally = ByteTally()
    for image in images:
        tally.add(image)
    return tally.totals()


class ByteTally:
    """`byte_totals` one image at a time, so that a caller reading outcomes from a
    cursor never holds them all: only the output URLs seen, to count each once."""

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self._in = 0
        self._out = 0

    def add(self, image: Outcome) -> None:
        url = image.get("output_url")
        if image.get("outcome", "ok") != "ok" or not url or url in self._seen:
            return
        self._seen.add(url)
        self._in += image.get("bytes_in") or 0
        self._out += image.get("bytes_out") or 0

    def totals(self) -> ByteTotals:
        return stored_totals(len(self._seen), self._in, self._out)


def stored_totals(images: int, bytes_in: int, bytes_out: int) -> ByteTotals:
    """The totals of `images` stored images, with their ratio (None when none was)."""
    ratio = round(bytes_out / bytes_in, 4) if bytes_in else None
    return {"images": images, "input": bytes_in, "output": bytes_out, "ratio": ratio}
