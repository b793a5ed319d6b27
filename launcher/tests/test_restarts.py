"""The restart rule of `imgpipe up`: backoff, stability, crash loops, the test setting."""

from __future__ import annotations

import signal

import pytest

from imgpipe.launcher.restarts import BACKOFF_VARIABLE, CrashHistory, RestartPolicy, describe_exit


def test_the_delay_starts_at_one_second_and_doubles_to_thirty() -> None:
    crashes = CrashHistory(RestartPolicy())
    # One crash every 20 s, each after 19 s of running: never 5 within 60 s, never stable.
    delays = [crashes.record(now=20.0 * i, uptime=19.0) for i in range(8)]

    assert delays == [1, 2, 4, 8, 16, 30, 30, 30]


def test_the_fifth_crash_within_sixty_seconds_is_a_crash_loop() -> None:
    crashes = CrashHistory(RestartPolicy())

    delays = [crashes.record(now=float(i), uptime=0.5) for i in range(5)]

    assert delays == [1, 2, 4, 8, None]
    assert crashes.recent == 5


def test_crashes_older_than_the_window_do_not_count() -> None:
    crashes = CrashHistory(RestartPolicy())
    for i in range(4):
        assert crashes.record(now=float(i), uptime=0.5) is not None

    # 4 crashes at 0-3 s; at 61 s only the ones at 2 and 3 s are within 60 s.
    assert crashes.record(now=61.0, uptime=10.0) == 16
    assert crashes.recent == 3


def test_a_service_that_ran_a_whole_window_starts_again_from_the_first_delay() -> None:
    crashes = CrashHistory(RestartPolicy())
    assert [crashes.record(now=float(i), uptime=0.5) for i in range(3)] == [1, 2, 4]

    assert crashes.record(now=200.0, uptime=120.0) == 1
    assert crashes.record(now=201.0, uptime=0.5) == 2


def test_the_backoff_setting_shortens_the_first_delay_only() -> None:
    policy = RestartPolicy.from_env({BACKOFF_VARIABLE: "0.1"})

    assert policy == RestartPolicy(first_delay=0.1)
    assert RestartPolicy.from_env({}) == RestartPolicy()
    assert RestartPolicy.from_env({BACKOFF_VARIABLE: " "}) == RestartPolicy()


@pytest.mark.parametrize("text", ["0", "-1", "soon", "nan", "31"])
def test_a_bad_backoff_setting_is_refused_with_its_name(text: str) -> None:
    with pytest.raises(ValueError, match=BACKOFF_VARIABLE):
        RestartPolicy.from_env({BACKOFF_VARIABLE: text})


def test_exits_are_described_as_a_user_reads_them() -> None:
    assert describe_exit(1) == "exit code 1"
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"
    assert describe_exit(-200) == "killed by signal 200"
