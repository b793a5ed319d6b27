"""Per-host download limits: halve on "too many", grow back on success, pause on
Retry-After, and one host never holds another's downloads."""

from __future__ import annotations

import asyncio

import pytest

from imgpipe.processor.adapters.host_limits import HostBusy, HostLimits, HostPaused, origin

A, B = "https://a.example:443", "https://b.example:443"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_an_origin_is_scheme_host_and_port() -> None:
    assert origin("https://cdn.example.com/a.jpg?v=1") == "https://cdn.example.com:443"
    assert origin("http://cdn.example.com/a.jpg") == "http://cdn.example.com:80"
    assert origin("http://cdn.example.com:8080/a.jpg") == "http://cdn.example.com:8080"
    assert origin("http://CDN.example.com/") == "http://cdn.example.com:80"


async def test_no_more_downloads_in_flight_than_the_limit() -> None:
    limits = HostLimits(3)
    in_flight = peak = 0

    async def fetch() -> None:
        nonlocal in_flight, peak
        async with limits.slot(A, max_wait=1):
            in_flight += 1
            peak = max(peak, in_flight)
            await asyncio.sleep(0.01)
            in_flight -= 1

    await asyncio.gather(*(fetch() for _ in range(20)))
    assert peak == 3


async def test_a_burst_of_throttled_answers_halves_the_limit_once() -> None:
    clock = Clock()
    limits = HostLimits(6, clock)
    slots = []
    for _ in range(6):
        async with limits.slot(A, max_wait=1) as slot:
            slots.append(slot)
    clock.now += 1
    for slot in slots:  # six 429s to downloads all started before the first cut
        limits.throttled(slot, retry_after=None)
    assert limits.limit(A) == 3
    async with limits.slot(A, max_wait=1) as later:
        pass
    limits.throttled(later, retry_after=None)  # started after the cut: cuts again
    assert limits.limit(A) == 1
    limits.throttled(later, retry_after=None)
    assert limits.limit(A) == 1  # never below one


async def test_successes_grow_the_limit_back_to_the_ceiling() -> None:
    limits = HostLimits(4)
    async with limits.slot(A, max_wait=1) as slot:
        limits.throttled(slot, retry_after=None)
    assert limits.limit(A) == 2
    successes = 0
    while limits.limit(A) < 4:
        async with limits.slot(A, max_wait=1) as slot:
            limits.succeeded(slot)
        successes += 1
    # One more download in flight per round of successes: 2 + 1/2 + 1/2.5 + ...
    assert 3 <= successes <= 6
    for _ in range(10):
        async with limits.slot(A, max_wait=1) as slot:
            limits.succeeded(slot)
    assert limits.limit(A) == 4  # never past the ceiling


async def test_retry_after_pauses_the_host_and_not_the_others() -> None:
    limits = HostLimits(6)
    async with limits.slot(A, max_wait=1) as slot:
        limits.throttled(slot, retry_after=30)
    assert 29 < limits.paused_for(A) <= 30
    with pytest.raises(HostPaused) as paused:
        async with limits.slot(A, max_wait=5):
            pass
    assert paused.value.seconds > 29
    async with asyncio.timeout(1):  # another host is not held
        async with limits.slot(B, max_wait=5):
            pass


async def test_a_short_pause_is_waited_out() -> None:
    limits = HostLimits(6)
    async with limits.slot(A, max_wait=1) as slot:
        limits.throttled(slot, retry_after=0.3)
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with limits.slot(A, max_wait=1):
        waited = loop.time() - started
    assert 0.25 < waited < 1


async def test_a_host_back_to_its_defaults_is_forgotten() -> None:
    limits = HostLimits(2)
    for n in range(100):
        async with limits.slot(f"http://host{n}.example:80", max_wait=1) as slot:
            limits.succeeded(slot)
    assert limits._hosts == {}
    async with limits.slot(A, max_wait=1) as slot:
        limits.throttled(slot, retry_after=None)
    assert set(limits._hosts) == {A}  # a throttled host is remembered


async def test_a_lone_uncertain_refusal_is_a_hiccup_two_in_a_row_are_not() -> None:
    clock = Clock()
    limits = HostLimits(6, clock)

    async def answer(refused: bool, certain: bool = False) -> None:
        clock.now += 1  # each answer in a round of its own
        async with limits.slot(A, max_wait=1) as slot:
            if refused:
                limits.throttled(slot, retry_after=None, certain=certain)
            else:
                limits.succeeded(slot)

    await answer(refused=True)  # a bare 503 among successes
    assert limits.limit(A) == 6
    await answer(refused=False)
    await answer(refused=True)
    assert limits.limit(A) == 6
    await answer(refused=True)  # a second in a row: the host is in trouble
    assert limits.limit(A) == 3
    await answer(refused=True, certain=True)  # a 429 always counts
    assert limits.limit(A) == 1


async def test_a_retry_goes_before_first_attempts() -> None:
    limits = HostLimits(1)
    order: list[str] = []

    async def fetch(name: str, retry: bool) -> None:
        async with limits.slot(A, max_wait=1, retry=retry):
            order.append(name)
            await asyncio.sleep(0.01)

    first = asyncio.create_task(fetch("first", retry=False))
    await asyncio.sleep(0)
    queued = [asyncio.create_task(fetch(f"new{n}", retry=False)) for n in range(3)]
    await asyncio.sleep(0)
    retry = asyncio.create_task(fetch("retry", retry=True))
    await asyncio.gather(first, *queued, retry)
    assert order[:2] == ["first", "retry"]


async def test_no_slot_within_the_queue_limit_is_busy() -> None:
    limits = HostLimits(1)
    async with limits.slot(A, max_wait=1):
        with pytest.raises(HostBusy):
            async with limits.slot(A, max_wait=1, max_queue=0.05):
                pass
    async with asyncio.timeout(1):  # the give-up left nothing behind
        async with limits.slot(A, max_wait=1, max_queue=0.05):
            pass
