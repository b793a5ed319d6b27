"""The shipped AsyncAPI document is what the models say, and its references resolve."""

from __future__ import annotations

import json
from pathlib import Path

from imgpipe.contracts.asyncapi import build_document, render

SHIPPED = Path(__file__).resolve().parents[3] / "docs" / "asyncapi.json"


def test_shipped_document_is_current() -> None:
    assert SHIPPED.read_text() == render(), (
        "docs/asyncapi.json is stale: run "
        "`uv run python -m imgpipe.contracts.asyncapi > docs/asyncapi.json`"
    )


def test_every_reference_resolves_and_every_event_is_described() -> None:
    document = build_document()
    text = json.dumps(document)
    for ref in {part.split('"')[0] for part in text.split('"$ref": "')[1:]}:
        node = document
        for key in ref.removeprefix("#/").split("/"):
            node = node[key]
    types = {
        message["payload"]["properties"]["type"]["const"]
        for message in document["components"]["messages"].values()
    }
    assert types == {
        "io.imgpipe.request.received.v1",
        "io.imgpipe.image.processed.v1",
        "io.imgpipe.request.completed.v1",
        "io.imgpipe.request.cancel_requested.v1",
        "io.imgpipe.request.cancelled.v1",
        "io.imgpipe.request.retry_requested.v1",
        "io.imgpipe.request.retry_started.v1",
        "io.imgpipe.request.deleted.v1",
    }
    assert {channel["address"] for channel in document["channels"].values()} == {
        "request.received",
        "image.processed",
        "request.completed",
        "request.cancel_requested",
        "request.cancelled",
        "request.retry_requested",
        "request.retry_started",
        "request.deleted",
    }
