"""Peak memory (VmHWM) of every process under `imgpipe up`, sampled from /proc."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

PROC = Path("/proc")


@dataclass
class ProcessPeak:
    pid: int
    label: str
    service: str
    peak_kib: int = 0
    alive: bool = True


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _parent_of(pid: int) -> int | None:
    stat = _read(PROC / str(pid) / "stat")
    if not stat:
        return None
    # Field 4 follows the command name, which may hold spaces: split after its last ')'.
    return int(stat.rsplit(")", 1)[1].split()[1])


def _descendants(root: int) -> dict[int, int]:
    """pid -> parent pid for every process below `root`."""
    parents = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit() and (parent := _parent_of(int(entry.name))) is not None:
            parents[int(entry.name)] = parent
    found: dict[int, int] = {}
    frontier = [root]
    while frontier:
        current = frontier.pop()
        for pid, parent in parents.items():
            if parent == current and pid not in found:
                found[pid] = parent
                frontier.append(pid)
    return found


def _vm_hwm_kib(pid: int) -> int | None:
    status = _read(PROC / str(pid) / "status")
    for line in (status or "").splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return None


def _cmdline(pid: int) -> str:
    return (_read(PROC / str(pid) / "cmdline") or "").replace("\0", " ")


def _service_label(pid: int) -> str:
    command = _cmdline(pid)
    if "secantusd" in command:
        return "mongo (embedded SecantusDB)"
    if "imgpipe." in command and ".main import main" in command:
        return command.split("imgpipe.", 1)[1].split(".", 1)[0]
    return command.split(" ", 1)[0].rsplit("/", 1)[-1] or f"pid {pid}"


def _worker_kind(pid: int) -> str:
    command = _cmdline(pid)
    for marker, kind in (("resource_tracker", "resource tracker"), ("forkserver", "forkserver")):
        if marker in command:
            return kind
    return "pool worker"


@dataclass
class MemorySampler:
    """A thread that keeps, per process, the highest VmHWM seen; `snapshot` reads it."""

    root: int
    # VmHWM is the kernel's own high-water mark, so sampling often adds nothing but CPU
    # (each sample reads every process's stat): it only has to see a process before it exits.
    interval: float = 2.0
    peaks: dict[int, ProcessPeak] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> MemorySampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        tree = {self.root: 0} | _descendants(self.root)  # parents before their children
        with self._lock:
            for peak in self.peaks.values():
                peak.alive = peak.pid in tree
            for pid, parent in tree.items():
                if (kib := _vm_hwm_kib(pid)) is None:
                    continue
                if pid not in self.peaks:
                    self.peaks[pid] = self._new_peak(pid, parent)
                self.peaks[pid].peak_kib = max(self.peaks[pid].peak_kib, kib)

    def _new_peak(self, pid: int, parent: int) -> ProcessPeak:
        if pid == self.root:
            return ProcessPeak(pid, "launcher (imgpipe up)", "launcher")
        if parent == self.root:
            service = _service_label(pid)
            return ProcessPeak(pid, service, service)
        owner = self.peaks.get(parent)
        service = owner.service if owner else f"pid {parent}"
        # A forkserver's children share its command line, yet they are the pool's workers.
        forked = owner is not None and owner.label.endswith("forkserver")
        kind = "pool worker" if forked else _worker_kind(pid)
        return ProcessPeak(pid, f"{service} {kind}", service)

    def snapshot(self) -> dict[int, ProcessPeak]:
        """pid -> a copy of its peak so far, in the order processes were first seen."""
        self.sample()
        with self._lock:
            return {pid: replace(peak) for pid, peak in self.peaks.items()}
