"""The read cache: what a client sees while answers come from memory.

Expiry is driven by a clock the tests step by hand, so no test waits on wall time.
"""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from imgpipe.contracts.bus import Bus
from imgpipe.contracts.events import (
    CloudEvent,
    Row,
    image_key,
)
from imgpipe.contracts.settings import Settings
from imgpipe.status.app import create_app
from imgpipe.status.config import ReadCacheConfig
from imgpipe.status.read_cache import ReadCache
from imgpipe.status.routes import accepts_gzip, etag_matches
from imgpipe.status.schemas import StatusResponse
from imgpipe.status.views import Rendered, render, status_body
from tests.support import events
from tests.support.apps import serving_with_bus
from tests.support.events import new_request_id

TTL, FINAL_TTL = 5.0, 600.0
# Enough rows that the answer is gzipped (over 1 KB), as a real request's would be.
ROWS = [
    Row(
        serial_number=str(n + 1),
        product_name=f"Product {n + 1}",
        input_urls=[f"http://in/{n}-{p}.jpg" for p in range(2)],
    )
    for n in range(10)
]
KEYS = [(r, p) for r in range(len(ROWS)) for p in range(2)]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def received(request_id: str) -> CloudEvent:
    return events.received(request_id, ROWS)


def processed(request_id: str, row: int, position: int) -> CloudEvent:
    return events.processed(request_id, row, position, input_url=ROWS[row].input_urls[position])


def completed(request_id: str) -> CloudEvent:
    return events.completed(request_id, len(KEYS))


@asynccontextmanager
async def running(
    settings: Settings, clock: Clock
) -> AsyncIterator[tuple[httpx.AsyncClient, Bus, Any]]:
    app = create_app(settings, ReadCacheConfig(ttl=TTL, final_ttl=FINAL_TTL), clock)
    async with serving_with_bus(app, settings, "http://status") as (client, bus):
        yield client, bus, app


async def stored(app: Any, request_id: str, until: Any) -> dict[str, Any]:
    """Wait until the read model (not the cache) holds what `until` wants."""
    for _ in range(300):
        doc = await app.state.runtime.repository.get(request_id)
        if doc is not None and until(doc):
            return doc
        await asyncio.sleep(0.05)
    raise AssertionError(f"the read model never got there: {doc}")


# Through the service, against the real broker and database --------------------------


async def test_what_this_instance_writes_shows_at_once(settings: Settings) -> None:
    """The clock never moves: each new answer comes from the write dropping the old one,
    not from the TTL running out."""
    clock = Clock()
    request_id = new_request_id()
    path = f"/status/{request_id}"
    async with running(settings, clock) as (client, bus, app):
        assert (await client.get(path)).status_code == 404  # an unknown id is not kept
        await bus.publish(received(request_id))
        await stored(app, request_id, lambda doc: doc.get("received"))
        assert (await client.get(path)).json()["status"] == "received"

        await bus.publish(processed(request_id, 0, 0))
        await stored(app, request_id, lambda doc: doc.get("images"))
        body = (await client.get(path)).json()
        assert body["status"] == "processing"
        assert body["progress"] == {"total": len(KEYS), "ok": 1, "failed": 0}
        assert body["products"][0]["output_urls"][0] == f"http://media/{request_id}/0-0.jpg"

        await bus.publish(completed(request_id))
        await stored(app, request_id, lambda doc: doc.get("final_status"))
        assert (await client.get(path)).json()["status"] == "completed"


async def test_a_settled_answer_is_kept_and_equals_a_fresh_one(settings: Settings) -> None:
    clock = Clock()
    request_id = new_request_id()
    path = f"/status/{request_id}"
    async with running(settings, clock) as (client, bus, app):
        await bus.publish(received(request_id))
        await bus.publish_many([processed(request_id, r, p) for r, p in KEYS])
        await bus.publish(completed(request_id))
        doc = await stored(app, request_id, lambda d: len(d.get("images", {})) == len(KEYS))
        doc = await stored(app, request_id, lambda d: d.get("final_status"))
        cached = await client.get(path, headers={"Accept-Encoding": "identity"})
        assert cached.json()["status"] == "completed"

        # The same bytes a fresh render of the document gives, in the documented schema.
        fresh = render(doc)
        assert fresh.settled
        assert cached.content == fresh.body
        assert StatusResponse.model_validate_json(cached.content).model_dump_json().encode() == (
            cached.content
        )
        csv = await client.get(f"{path}/output.csv")
        assert csv.content == fresh.csv
        assert csv.headers["x-imgpipe-status"] == "completed"

        # Past the short TTL the answer still comes from memory: it can no longer change.
        await app.state.runtime.repository.requests.delete_one({"_id": request_id})
        clock.now += TTL * 10
        again = await client.get(path, headers={"Accept-Encoding": "identity"})
        assert again.content == cached.content
        # Kept no longer than final_ttl, though.
        clock.now += FINAL_TTL
        assert (await client.get(path)).status_code == 404


async def test_etag_lets_a_poller_skip_unchanged_answers(settings: Settings) -> None:
    clock = Clock()
    request_id = new_request_id()
    path = f"/status/{request_id}"
    async with running(settings, clock) as (client, bus, app):
        await bus.publish(received(request_id))
        await stored(app, request_id, lambda doc: doc.get("received"))
        first = await client.get(path)
        assert first.status_code == 200
        assert first.headers["content-encoding"] == "gzip"  # httpx asks for it by default
        assert "Accept-Encoding" in first.headers["vary"].split(", ")
        assert first.headers["cache-control"] == "no-cache"
        etag = first.headers["etag"]

        unchanged = await client.get(path, headers={"If-None-Match": etag})
        assert unchanged.status_code == 304
        assert unchanged.content == b""
        assert unchanged.headers["etag"] == etag
        # Same content, other encoding: still nothing to send.
        plain = await client.get(path, headers={"Accept-Encoding": "identity"})
        assert plain.headers["etag"] != etag
        assert "content-encoding" not in plain.headers
        assert plain.json() == first.json()
        revalidated = await client.get(
            path, headers={"If-None-Match": f'"other", W/{etag}', "Accept-Encoding": "identity"}
        )
        assert revalidated.status_code == 304

        # Once the request changes (and the TTL has passed) the old tag no longer matches.
        await bus.publish(processed(request_id, 0, 0))
        await stored(app, request_id, lambda doc: doc.get("images"))
        clock.now += TTL
        changed = await client.get(path, headers={"If-None-Match": etag})
        assert changed.status_code == 200
        assert changed.headers["etag"] != etag
        assert changed.json()["progress"]["ok"] == 1

        csv = await client.get(f"{path}/output.csv")
        assert csv.status_code == 200
        tag = csv.headers["etag"]
        again = await client.get(f"{path}/output.csv", headers={"If-None-Match": tag})
        assert again.status_code == 304


async def test_openapi_still_documents_the_status_body(settings: Settings) -> None:
    async with running(settings, Clock()) as (client, _bus, _app):
        spec = (await client.get("/openapi.json")).json()
        responses = spec["paths"]["/status/{request_id}"]["get"]["responses"]
        schema = responses["200"]["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/StatusResponse"}
        assert "304" in responses and "404" in responses


# The cache alone, over a loader that counts its calls ----------------------------------


def answer(size: int = 100, *, settled: bool = False, tag: str = "") -> Rendered:
    return Rendered.of(b"x" * size + tag.encode(), "processing", settled)


class Loader:
    def __init__(self, rendered: Rendered | None) -> None:
        self.rendered = rendered
        self.calls = 0
        self.release = asyncio.Event()
        self.release.set()
        self.entered = asyncio.Event()

    async def __call__(self, request_id: str) -> Rendered | None:
        self.calls += 1
        self.entered.set()
        await self.release.wait()
        return self.rendered


async def test_concurrent_misses_share_one_read() -> None:
    loader = Loader(answer())
    cache = ReadCache(loader, ReadCacheConfig(ttl=TTL), Clock())
    loader.release.clear()
    readers = [asyncio.create_task(cache.get("r")) for _ in range(10)]
    await asyncio.sleep(0)
    readers[0].cancel()  # one client going away does not cancel the others' read
    loader.release.set()
    results = await asyncio.gather(*readers[1:])
    assert all(result is loader.rendered for result in results)
    assert loader.calls == 1


async def test_ttl_unknown_ids_and_disabled_cache() -> None:
    clock = Clock()
    loader = Loader(answer())
    cache = ReadCache(loader, ReadCacheConfig(ttl=TTL, stale=0), clock)
    await cache.get("r")
    clock.now += TTL - 1
    await cache.get("r")
    assert loader.calls == 1
    clock.now += 1
    await cache.get("r")
    assert loader.calls == 2

    missing = Loader(None)
    cache = ReadCache(missing, ReadCacheConfig(ttl=TTL), clock)
    assert await cache.get("r") is None
    assert await cache.get("r") is None
    assert missing.calls == 2

    off = Loader(answer(settled=True))
    cache = ReadCache(off, ReadCacheConfig(max_bytes=0), clock)
    await cache.get("r")
    await cache.get("r")
    assert off.calls == 2


async def test_a_read_that_began_before_a_write_is_not_kept() -> None:
    """Another instance's writes show once the TTL has passed; this instance's own drop
    the answer at once, including one whose read was in flight during the write."""
    clock = Clock()
    loader = Loader(answer())
    cache = ReadCache(loader, ReadCacheConfig(ttl=TTL), clock)
    await cache.get("r")
    cache.invalidate(["r"])
    await cache.get("r")
    assert loader.calls == 2

    cache.invalidate(["r"])
    loader.release.clear()
    loader.entered.clear()
    reading = asyncio.create_task(cache.get("r"))
    await loader.entered.wait()
    cache.invalidate(["r"])  # the write lands while that read is in flight
    loader.release.set()
    assert await reading is loader.rendered  # its reader gets it...
    await cache.get("r")
    assert loader.calls == 4  # ...but it is not served to the next one

    await cache.get("r")
    assert loader.calls == 4  # and a read after the write is kept as usual


async def test_a_slow_read_is_kept_longer_and_only_a_status_change_drops_it() -> None:
    """A large request's read takes long (its outcomes are read whole for the counts):
    kept read time / read_share, through its progress writes, so that polling it keeps
    an instance reading at most that share of the time. A status change still shows at
    once; a fast request's progress too."""
    clock = Clock()
    loader = Loader(answer())
    slow = Loader(answer())

    async def slow_read(request_id: str) -> Rendered | None:
        clock.now += 1.0  # the read takes a second
        return await slow(request_id)

    config = ReadCacheConfig(ttl=0.25, read_share=0.2)
    cache = ReadCache(slow_read, config, clock)
    await cache.get("large")
    clock.now += 3.5
    cache.invalidate(["large"], urgent=[])  # outcomes written: progress only
    await cache.get("large")
    assert slow.calls == 1  # kept 1 s / 0.2 = 5 s from the read's start
    clock.now += 1.0
    await cache.get("large")  # past its time: served while read again
    await asyncio.sleep(0)
    assert slow.calls == 2
    cache.invalidate(["large"], urgent=["large"])  # e.g. its RequestCompleted
    await cache.get("large")
    assert slow.calls == 3

    fast = ReadCache(loader, config, clock)
    await fast.get("small")
    fast.invalidate(["small"], urgent=[])
    await fast.get("small")
    await asyncio.sleep(0)
    assert loader.calls == 2  # a quick read's progress is read again at once


async def test_a_stale_answer_is_served_while_one_read_refreshes_it() -> None:
    """Stale-while-revalidate: past its TTL, or after a progress write, a request in
    progress gets its previous answer at once while one read runs in the background;
    the next poll gets the new one. A status change, a settled answer, an answer past
    `stale`, and a failed or 404 refresh all make the poll wait for the database."""
    clock = Clock()
    loader = Loader(answer(tag="1"))
    cache = ReadCache(loader, ReadCacheConfig(ttl=TTL, stale=2.0), clock)
    first = await cache.get("r")
    clock.now += TTL
    loader.rendered = answer(tag="2")
    loader.release.clear()
    polls = [await cache.get("r") for _ in range(3)]  # none of them waits for the read
    await asyncio.sleep(0)
    assert polls == [first] * 3 and loader.calls == 2
    loader.release.set()
    await asyncio.sleep(0)
    assert await cache.get("r") is loader.rendered and loader.calls == 2

    cache.invalidate(["r"], urgent=[])  # more outcomes: served stale, read again
    assert await cache.get("r") is loader.rendered
    await asyncio.sleep(0)
    assert loader.calls == 3
    cache.invalidate(["r"], urgent=["r"])  # a status change: the poll waits for it
    loader.rendered = answer(tag="3")
    assert await cache.get("r") is loader.rendered and loader.calls == 4

    clock.now += TTL + 2.0  # past `stale` too: waits
    loader.rendered = answer(tag="4")
    assert await cache.get("r") is loader.rendered and loader.calls == 5

    failing = Loader(answer())
    cache = ReadCache(failing, ReadCacheConfig(ttl=TTL, stale=2.0), clock)
    await cache.get("r")
    clock.now += TTL

    async def broken(request_id: str) -> Rendered | None:
        raise ConnectionError("database down")

    cache._load = broken  # the background read fails...
    await cache.get("r")
    await asyncio.sleep(0)
    with pytest.raises(ConnectionError):  # ...so the next poll waits and hears why
        await cache.get("r")

    settled = Loader(answer(settled=True))
    cache = ReadCache(settled, ReadCacheConfig(ttl=TTL, final_ttl=TTL, stale=2.0), clock)
    await cache.get("r")
    clock.now += TTL
    settled.rendered = None  # deleted meanwhile: a settled answer is never served stale
    assert await cache.get("r") is None


async def test_memory_is_bounded_least_recently_used_first() -> None:
    clock = Clock()
    size = answer(settled=True).nbytes
    loader = Loader(answer(settled=True))
    cache = ReadCache(loader, ReadCacheConfig(max_bytes=3 * size), clock)
    for request_id in ("a", "b", "c"):
        await cache.get(request_id)
    await cache.get("a")  # now "b" is the least recently used
    await cache.get("d")
    assert (len(cache), cache.nbytes) == (3, 3 * size)
    calls = loader.calls
    await cache.get("a")
    await cache.get("c")
    await cache.get("d")
    assert loader.calls == calls  # all three still kept
    await cache.get("b")
    assert loader.calls == calls + 1  # evicted, read again


# Rendering and header parsing ----------------------------------------------------------


def test_a_final_status_with_an_outcome_missing_is_not_settled() -> None:
    doc: dict[str, Any] = {
        "_id": "r",
        "received": True,
        "rows": [row.model_dump() for row in ROWS],
        "total": len(KEYS),
        "created_at": events.T0,
        "final_status": "completed",
        "final_counts": {"total": len(KEYS), "ok": len(KEYS), "failed": 0},
        "images": {image_key(r, p): {"outcome": "ok", "output_url": "u"} for r, p in KEYS[1:]},
    }
    assert status_body(doc)[1] is False  # the overtaken outcome may still arrive
    doc["images"]["0-0"] = {"outcome": "ok", "output_url": "u"}
    assert status_body(doc)[1] is True
    rendered = render(doc)
    assert gzip.decompress(rendered.gzipped or b"") == rendered.body


def test_header_parsing() -> None:
    assert accepts_gzip("gzip, deflate")
    assert accepts_gzip("br;q=1.0, GZIP;q=0.5")
    assert accepts_gzip("*")
    assert not accepts_gzip(None)
    assert not accepts_gzip("identity")
    assert not accepts_gzip("gzip;q=0")
    assert etag_matches('"a", "b"', '"b"')
    assert etag_matches('W/"b"', '"b"')
    assert etag_matches("*", '"b"')
    assert not etag_matches('"a"', '"b"')
    assert not etag_matches(None, '"b"')
