"""Exec a command that dies with the process that started it.

    python -m imgpipe.launcher.tethered PARENT_PID -- COMMAND [ARG ...]

`imgpipe up` starts its children through this wrapper so that a launcher killed
with SIGKILL (OOM killer, `kill -9`, a CI timeout) does not leave services holding
their ports and a database holding its storage. On Linux the wrapper asks the
kernel for SIGTERM when its parent dies (PR_SET_PDEATHSIG), then execs the
command: the setting survives exec (not into setuid binaries) and the pid stays
the same, so the launcher's process groups and signals work unchanged. Elsewhere
the wrapper just execs. This replaces Popen's preexec_fn, which is unsafe while
the launcher runs output-pump threads.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
PARENT_GONE_EXIT_CODE = 75
USAGE_EXIT_CODE = 2
USAGE = "usage: python -m imgpipe.launcher.tethered PARENT_PID -- COMMAND [ARG ...]"
EXEC_FAILED_EXIT_CODE = 127


def tethered_command(command: list[str], parent_pid: int | None = None) -> list[str]:
    """`command` run through this wrapper, tied to `parent_pid` (default: this process).

    The kernel ties the child to the thread that forks it, not the process: start it
    from a thread that lives as long as the launcher (its main thread).
    """
    parent = os.getpid() if parent_pid is None else parent_pid
    return [sys.executable, "-m", "imgpipe.launcher.tethered", str(parent), "--", *command]


def request_death_signal(signum: int = signal.SIGTERM) -> bool:
    """Ask Linux to send `signum` when the parent dies; False where that is not possible."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"prctl(PR_SET_PDEATHSIG): {os.strerror(error)}")
    return True


def _parse(argv: list[str]) -> tuple[int, list[str]] | None:
    if len(argv) < 3 or argv[1] != "--" or not argv[0].isdigit():
        return None
    return int(argv[0]), argv[2:]


def _restore_default_signals() -> None:
    # The interpreter ignores these at startup and ignored signals survive exec;
    # subprocess resets them for its children, so must we.
    for name in ("SIGPIPE", "SIGXFSZ"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_DFL)


def main(argv: list[str] | None = None) -> int:
    parsed = _parse(sys.argv[1:] if argv is None else argv)
    if parsed is None:
        print(USAGE, file=sys.stderr)
        return USAGE_EXIT_CODE
    parent_pid, command = parsed
    # Checked after prctl: a parent that died before it would never send the signal.
    if request_death_signal() and os.getppid() != parent_pid:
        print(f"tethered: parent {parent_pid} is gone; not starting {command[0]}", file=sys.stderr)
        return PARENT_GONE_EXIT_CODE
    _restore_default_signals()
    try:
        os.execvp(command[0], command)  # noqa: S606 (an argv list, never a shell)
    except OSError as error:
        print(f"tethered: cannot run {command[0]}: {error}", file=sys.stderr)
    return EXEC_FAILED_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
