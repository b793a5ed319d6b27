"""IMGPIPE_LOG_FORMAT: text lines by default, one JSON object per line when asked."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from imgpipe.contracts.logs import configure_logging, request_context
from imgpipe.contracts.tracing import span


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level


def test_json_lines_carry_service_level_and_the_request_in_hand(capsys) -> None:
    configure_logging("processor", "json")
    log = logging.getLogger("imgpipe.processor.handlers")
    with request_context("req-123"):
        log.info("image %s stored", "0-1")
    log.warning("between requests")
    first, second = (json.loads(line) for line in capsys.readouterr().err.splitlines())
    assert first["message"] == "image 0-1 stored"
    assert first["level"] == "INFO" and first["service"] == "processor"
    assert first["logger"] == "imgpipe.processor.handlers"
    assert first["request_id"] == "req-123" and "time" in first
    assert second["level"] == "WARNING" and "request_id" not in second


def test_text_is_the_default_format(capsys) -> None:
    configure_logging("ingest", "text")
    logging.getLogger("imgpipe.ingest").info("hello")
    [line] = capsys.readouterr().err.splitlines()
    assert line.endswith("INFO imgpipe.ingest: hello")


def test_json_lines_carry_the_current_trace(capsys) -> None:
    configure_logging("status", "json")
    log = logging.getLogger("imgpipe.status.handlers")
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with span("handle", parent=parent):
        log.info("in the trace")
    with span("upload"):  # a new trace: ids are made even with no SDK installed
        log.info("in a new trace")
    log.info("outside any span")
    first, second, third = (json.loads(line) for line in capsys.readouterr().err.splitlines())
    assert first["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert len(second["trace_id"]) == 32 and second["trace_id"] != first["trace_id"]
    assert "trace_id" not in third
