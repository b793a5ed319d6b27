"""Reading a service's /metrics in tests: samples by name and labels, and promtool's
verdict on the exposition."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(client: httpx.AsyncClient) -> tuple[str, Samples]:
    """The exposition text, and every sample in it."""
    response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def promtool_path() -> str:
    """promtool, found on the PATH. CI installs it (Debian's prometheus package) and sets
    IMGPIPE_REQUIRE_PROMTOOL; elsewhere a test that needs it is skipped when it is missing."""
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("IMGPIPE_REQUIRE_PROMTOOL"):
            raise AssertionError("promtool is required here: apt-get install prometheus")
        pytest.skip("promtool not installed (Debian: apt-get install prometheus)")
    return promtool


def promtool_check(text: str) -> None:
    """`promtool check metrics` passes on the exposition (lint: names, units, help)."""
    promtool = promtool_path()
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


async def scrape_until(
    client: httpx.AsyncClient, ready: Callable[[Samples], bool], seconds: float = 10.0
) -> tuple[str, Samples]:
    """Scrape until `ready(samples)` holds: a counter may move just after the event a
    test waited for (a service publishes, then counts)."""
    deadline = time.monotonic() + seconds
    while True:
        text, samples = await scrape(client)
        if ready(samples) or time.monotonic() > deadline:
            return text, samples
        await asyncio.sleep(0.05)


def exposed_names(text: str) -> set[str]:
    """Every sample name the exposition `text` can carry, from its families' names and
    types: a labelled counter nothing has counted yet declares its family, no sample."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "summary": ("", "_count", "_sum", "_created"),
    }
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names |= {family.name + suffix for suffix in suffixes.get(family.type, ("",))}
        names |= {sample.name for sample in family.samples}
    return names


def imgpipe_names(promql: str) -> set[str]:
    """The imgpipe_ metric names a PromQL expression reads."""
    return set(re.findall(r"\bimgpipe_[A-Za-z0-9_]+", promql))
