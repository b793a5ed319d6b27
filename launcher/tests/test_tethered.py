"""The exec wrapper that ties each child of `imgpipe up` to the launcher's life."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from imgpipe.launcher.tethered import PARENT_GONE_EXIT_CODE, tethered_command

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's"
)

# Prints the signal the kernel will send this process when its parent dies (0: none).
PRINT_DEATH_SIGNAL = (
    "import ctypes; libc = ctypes.CDLL(None); sig = ctypes.c_int(); "
    "libc.prctl(2, ctypes.byref(sig), 0, 0, 0); print(sig.value)"  # 2: PR_GET_PDEATHSIG
)


@linux_only
def test_the_command_runs_with_sigterm_as_its_parent_death_signal() -> None:
    result = subprocess.run(
        tethered_command([sys.executable, "-c", PRINT_DEATH_SIGNAL]),
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "15"


@linux_only
def test_a_parent_that_is_already_gone_means_the_command_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    not_the_parent = os.getppid()  # alive, but not the wrapper's parent

    result = subprocess.run(
        tethered_command(["touch", str(marker)], parent_pid=not_the_parent),
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == PARENT_GONE_EXIT_CODE
    assert "is gone" in result.stderr
    assert not marker.exists()


def test_a_command_that_cannot_run_is_an_error() -> None:
    result = subprocess.run(
        tethered_command(["/nonexistent/imgpipe-no-such-command"]),
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 127
    assert "cannot run" in result.stderr
