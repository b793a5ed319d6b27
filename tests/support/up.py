"""`imgpipe up` run as a user runs it, its console output collected for the tests to read."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from imgpipe.contracts.settings import Settings
from tests.support.system import settings_env, with_free_ports

IMGPIPE = [sys.executable, "-m", "imgpipe.launcher"]


@dataclass
class Up:
    """A running `imgpipe up` whose output is collected line by line."""

    process: subprocess.Popen
    settings: Settings
    env: dict[str, str]
    lines: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def pid_of(self, name: str) -> int | None:
        """The pid of the service `name` as last started (the launcher says so)."""
        said = f"imgpipe: started {name} (pid "
        for line in reversed(list(self.lines)):
            if line.startswith(said):
                return int(line[len(said) :].split(",", 1)[0])
        return None

    def wait_until_up(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while "Press Ctrl-C to stop." not in self.lines:
            if self.process.poll() is not None:
                time.sleep(0.5)  # the last lines
                pytest.fail(f"imgpipe up exited with {self.process.returncode}:\n{self.output}")
            if time.monotonic() > deadline:
                pytest.fail(f"imgpipe up did not come up:\n{self.output}")
            time.sleep(0.2)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(90)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise


def start_up(settings: Settings, *args: str, embedded: bool, **env_overrides: str) -> Up:
    """`imgpipe up ARGS` on free ports; `embedded`: it starts its own database."""
    settings = with_free_ports(settings)
    env = settings_env(settings, IMGPIPE_ALLOW_PRIVATE_URLS="true", **env_overrides)
    if embedded:
        env.pop("MONGODB_URL")
    return launch_up(settings, env, *args)


def launch_up(settings: Settings, env: dict[str, str], *args: str) -> Up:
    process = subprocess.Popen(
        [*IMGPIPE, "up", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return Up(process, settings, env)


# The launcher's process tree (Linux /proc) -------------------------------------------


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (Linux /proc), children of children included."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_until_gone(pids: set[int], timeout: float) -> list[int]:
    """Polls until every pid has exited; returns those still alive at the deadline."""
    deadline = time.monotonic() + timeout
    while (survivors := sorted(pid for pid in pids if alive(pid))) and time.monotonic() < deadline:
        time.sleep(0.2)
    return survivors


def kill_groups(pids: set[int]) -> None:
    """Cleanup for a failed test: leave no service or database running on the machine."""
    for pid in pids:
        with suppress(OSError):
            os.killpg(pid, signal.SIGKILL)
        with suppress(OSError):
            os.kill(pid, signal.SIGKILL)
