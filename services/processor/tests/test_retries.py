"""Downloads from hosts that behave like real ones: throttling, hiccups, resets, stalls.

Every host here is a loopback `RemoteHost` that counts the connections it sees.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from imgpipe.contracts.settings import VERSION, Settings
from imgpipe.processor.adapters.download import (
    Attempts,
    Downloader,
    FailedDownload,
    RetryLater,
    RetryPolicy,
)
from imgpipe.processor.bootstrap import build_downloader
from tests.support.images import jpeg_bytes
from tests.support.remote_host import (
    Behaviour,
    RemoteHost,
    Reset,
    Stall,
    Status,
    http_date_in,
    remote_host,
)

JPEG = jpeg_bytes(64, 48)
# Backoff kept short so that the tests take seconds; the rules are the production ones.
FAST = RetryPolicy(
    attempts=4, max_wait=300, wait_in_place=5, backoff_base=0.05, throttled_backoff_base=0.05
)


@pytest.fixture
def host() -> Iterator[RemoteHost]:
    with remote_host() as host:
        yield host


def make_downloader(policy: RetryPolicy = FAST, **settings: object) -> Downloader:
    base = Settings(IMGPIPE_ALLOW_PRIVATE_URLS=True, IMGPIPE_DOWNLOAD_TIMEOUT=2, **settings)
    downloader = build_downloader(base)
    return Downloader(
        downloader.client, downloader.max_bytes, downloader.deadline, downloader.hosts, policy
    )


@pytest.fixture
async def downloader() -> AsyncIterator[Downloader]:
    downloader = make_downloader()
    try:
        yield downloader
    finally:
        await downloader.aclose()


@pytest.mark.parametrize(
    "script",
    [
        [Status(503)],
        [Status(503), Status(502), Status(500)],
        [Status(429)],  # no Retry-After: backoff
        [Status(429, "1")],
        [Status(429, http_date_in(1))],
        [Status(408), Status(425), Status(504)],
        [Stall(3)],  # past the 2 s read timeout
    ],
    ids=["503", "503-502-500", "429", "429-seconds", "429-date", "408-425-504", "stall"],
)
async def test_a_transient_failure_is_tried_again(
    host: RemoteHost, downloader: Downloader, script: list
) -> None:
    url = host.add("/a.jpg", JPEG, *script)
    downloaded = await downloader(url)
    assert downloaded.body == JPEG
    assert downloaded.attempts.count == len(script) + 1
    assert len(host.requests_for("/a.jpg")) == len(script) + 1


async def test_a_reset_connection_is_tried_again(host: RemoteHost, downloader: Downloader) -> None:
    # aiohttp itself tries a GET again once on a connection closed before the answer;
    # the second reset is ours to retry.
    url = host.add("/a.jpg", JPEG, Reset(), Reset())
    downloaded = await downloader(url)
    assert downloaded.body == JPEG
    assert downloaded.attempts.count == 2
    assert [seen.status for seen in host.requests_for("/a.jpg")] == [0, 0, 200]


async def test_retry_after_is_honoured(host: RemoteHost, downloader: Downloader) -> None:
    url = host.add("/a.jpg", JPEG, Status(429, "2"))
    await downloader(url)
    first, second = host.requests_for("/a.jpg")
    assert second.at - first.at >= 1.9


@pytest.mark.parametrize("status", [404, 410, 401, 403, 400])
async def test_a_permanent_failure_fails_at_once(
    host: RemoteHost, downloader: Downloader, status: int
) -> None:
    url = host.add("/a.jpg", JPEG, Status(status), Status(status))
    with pytest.raises(FailedDownload) as failed:
        await downloader(url)
    assert failed.value.code == "http_error"
    assert failed.value.message.startswith(f"HTTP {status} ")
    assert f"from 127.0.0.1:{host.port}" in failed.value.message
    assert failed.value.attempts.count == 1
    assert len(host.requests_for("/a.jpg")) == 1


async def test_not_an_image_fails_at_once(host: RemoteHost, downloader: Downloader) -> None:
    url = host.add("/page", b"<html>hello</html>")
    with pytest.raises(FailedDownload) as failed:
        await downloader(url)
    assert failed.value.code == "not_an_image"
    assert len(host.requests_for("/page")) == 1


async def test_an_image_that_keeps_failing_says_what_happened(
    host: RemoteHost, downloader: Downloader
) -> None:
    url = host.add("/a.jpg", JPEG, *[Status(503)] * 10)
    with pytest.raises(FailedDownload) as failed:
        await downloader(url)
    message = failed.value.message
    assert message.startswith("HTTP 503 ")
    assert f"from 127.0.0.1:{host.port} after 4 attempts over " in message
    assert message.endswith(" s")
    assert failed.value.attempts.count == 4
    assert len(host.requests_for("/a.jpg")) == 4


async def test_attempts_made_before_parking_count(host: RemoteHost, downloader: Downloader) -> None:
    url = host.add("/a.jpg", JPEG, *[Status(503)] * 10)
    with pytest.raises(FailedDownload) as failed:
        await downloader(url, Attempts(3, time.time() - 60))
    assert failed.value.attempts.count == 4
    assert "after 4 attempts over 60 s" in failed.value.message
    assert len(host.requests_for("/a.jpg")) == 1


async def test_a_long_retry_after_parks_the_image(host: RemoteHost, downloader: Downloader) -> None:
    url = host.add("/a.jpg", JPEG, Status(429, "60"))
    with pytest.raises(RetryLater) as later:
        await downloader(url)
    assert 59 <= later.value.delay <= 60
    assert later.value.attempts.count == 1
    assert len(host.requests_for("/a.jpg")) == 1
    # The whole host is paused: another image of it parks without asking.
    other = host.add("/b.jpg", JPEG)
    with pytest.raises(RetryLater) as paused:
        await downloader(other)
    assert paused.value.attempts.count == 0
    assert host.requests_for("/b.jpg") == []


async def test_an_image_that_waits_too_long_for_its_host_parks() -> None:
    with remote_host(behaviour=Behaviour(latency=1.0)) as host:
        first, second = host.add("/1.jpg", JPEG), host.add("/2.jpg", JPEG)
        policy = RetryPolicy(
            backoff_base=0.05, throttled_backoff_base=0.05, max_queue=0.3, busy_retry=10
        )
        downloader = make_downloader(policy, IMGPIPE_PER_HOST_CONNECTIONS=1)
        try:
            results = await asyncio.gather(
                downloader(first), downloader(second), return_exceptions=True
            )
        finally:
            await downloader.aclose()
    assert results[0].body == JPEG
    parked = results[1]
    assert isinstance(parked, RetryLater)
    assert parked.delay == 10 and parked.attempts.count == 0  # no attempt was made
    assert host.requests_for("/2.jpg") == []


async def test_retry_after_beyond_the_cap_waits_the_cap(host: RemoteHost) -> None:
    downloader = make_downloader(
        RetryPolicy(attempts=4, max_wait=1.5, backoff_base=0.05, throttled_backoff_base=0.05)
    )
    try:
        url = host.add("/a.jpg", JPEG, Status(503, "86400"))
        assert (await downloader(url)).attempts.count == 2
    finally:
        await downloader.aclose()
    first, second = host.requests_for("/a.jpg")
    assert 1.4 <= second.at - first.at < 5


async def test_a_parked_image_is_not_tried_before_its_time(
    host: RemoteHost, downloader: Downloader
) -> None:
    url = host.add("/a.jpg", JPEG)
    with pytest.raises(RetryLater):
        await downloader(url, Attempts(1, time.time()), not_before=time.time() + 30)
    assert host.requests_for("/a.jpg") == []
    started = time.monotonic()
    downloaded = await downloader(url, Attempts(1, time.time()), not_before=time.time() + 1)
    assert time.monotonic() - started >= 0.9
    assert downloaded.attempts.count == 2


async def test_the_host_never_sees_more_connections_than_the_limit() -> None:
    behaviour = Behaviour(latency=0.05, max_connections=3)
    with remote_host(behaviour=behaviour) as host:
        urls = [host.add(f"/{n}.jpg", JPEG) for n in range(30)]
        downloader = make_downloader(IMGPIPE_PER_HOST_CONNECTIONS=3)
        try:
            results = await asyncio.gather(*(downloader(url) for url in urls))
        finally:
            await downloader.aclose()
    assert [r.body for r in results] == [JPEG] * 30
    assert host.peak_connections <= 3
    assert host.peak_in_flight == 3  # and it used what it was allowed
    assert host.statuses() == {200: 30}


async def test_a_host_that_throttles_sets_the_pace() -> None:
    """The host allows 2 connections; the limit of 6 comes down, every image arrives."""
    behaviour = Behaviour(latency=0.03, max_connections=2, throttle_retry_after=None)
    with remote_host(behaviour=behaviour) as host:
        urls = [host.add(f"/{n}.jpg", JPEG) for n in range(40)]
        downloader = make_downloader(
            RetryPolicy(attempts=8, backoff_base=0.05, throttled_backoff_base=0.05),
            IMGPIPE_PER_HOST_CONNECTIONS=6,
        )
        try:
            results = await asyncio.gather(*(downloader(url) for url in urls))
            limit_after = downloader.hosts.limit(host_origin(host))
        finally:
            await downloader.aclose()
    assert all(r.body == JPEG for r in results)
    statuses = host.statuses()
    assert statuses[200] == 40
    assert limit_after < 6
    # Throttled far fewer times than there were images: the limit came down and stayed.
    assert statuses[429] < 40


def host_origin(host: RemoteHost) -> str:
    return f"http://127.0.0.1:{host.port}"


async def test_downloads_say_who_is_asking(host: RemoteHost, downloader: Downloader) -> None:
    await downloader(host.add("/a.jpg", JPEG))
    [seen] = host.requests_for("/a.jpg")
    assert seen.headers["user-agent"] == f"imgpipe/{VERSION}"


async def test_the_user_agent_is_a_setting(host: RemoteHost) -> None:
    downloader = make_downloader(IMGPIPE_USER_AGENT="acme-catalogue/2 (ops@acme.example)")
    try:
        await downloader(host.add("/a.jpg", JPEG))
    finally:
        await downloader.aclose()
    [seen] = host.requests_for("/a.jpg")
    assert seen.headers["user-agent"] == "acme-catalogue/2 (ops@acme.example)"
