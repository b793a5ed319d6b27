"""When `imgpipe up` restarts a service that died, and when it gives up.

A service that exits on its own is restarted after a delay that starts at 1 s and doubles
with each crash, up to 30 s; a service that then runs for a whole window (60 s) is
stable again and its next restart waits 1 s. Five crashes of one service within the
window are a crash loop: a bug to report, not to hide, so the launcher stops.
IMGPIPE_RESTART_BACKOFF sets the first delay in seconds (tests make it short).
"""

from __future__ import annotations

import math
import signal
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

BACKOFF_VARIABLE = "IMGPIPE_RESTART_BACKOFF"


@dataclass(frozen=True)
class RestartPolicy:
    first_delay: float = 1.0
    max_delay: float = 30.0
    crash_limit: int = 5
    window: float = 60.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> RestartPolicy:
        """The default policy, with the first delay from IMGPIPE_RESTART_BACKOFF when set."""
        text = environ.get(BACKOFF_VARIABLE, "").strip()
        if not text:
            return cls()
        try:
            first = float(text)
        except ValueError:
            first = math.nan
        if not 0 < first <= cls.max_delay:
            raise ValueError(
                f"{BACKOFF_VARIABLE}={text!r}: must be seconds, more than 0 and at most "
                f"{cls.max_delay:.0f}"
            )
        return cls(first_delay=first)


@dataclass
class CrashHistory:
    """One service's recent crashes and the delay its next restart waits."""

    policy: RestartPolicy
    times: deque[float] = field(default_factory=deque)
    next_delay: float = 0.0

    def __post_init__(self) -> None:
        self.next_delay = self.policy.first_delay

    def record(self, now: float, uptime: float) -> float | None:
        """Note a crash at `now` after `uptime` seconds of running.

        Returns how long to wait before restarting, or None for a crash loop.
        """
        if uptime >= self.policy.window:
            self.next_delay = self.policy.first_delay  # it had been stable
        self.times.append(now)
        while self.times and self.times[0] <= now - self.policy.window:
            self.times.popleft()
        if len(self.times) >= self.policy.crash_limit:
            return None
        delay = self.next_delay
        self.next_delay = min(delay * 2, self.policy.max_delay)
        return delay

    @property
    def recent(self) -> int:
        """Crashes within the window, as of the last one recorded."""
        return len(self.times)


def describe_exit(code: int) -> str:
    """`exit code 1`, or `killed by SIGKILL` for a negative Popen return code."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
