"""CPU time per image, by process: where the cores go besides the codec.

Read from /proc (utime + stime) for every process under `imgpipe up`, for RabbitMQ
(beam.smp, not ours but on the same cores) and for the benchmark itself (it serves the
corpus). A phase's figure is the difference between a snapshot before and after it.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

from memory import PROC, MemorySampler

TICKS = os.sysconf("SC_CLK_TCK")
BENCH = "benchmark (corpus server, polling)"
BROKER = "rabbitmq (beam.smp)"


def _cpu_seconds(pid: int) -> float | None:
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def _broker_pids() -> list[int]:
    pids = []
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            try:
                command = Path(entry, "cmdline").read_bytes()
            except OSError:
                continue
            if b"beam.smp" in command:
                pids.append(int(entry.name))
    return pids


def snapshot(sampler: MemorySampler) -> dict[str, float]:
    """CPU seconds so far, summed per group: each service, its pool workers, the
    database, the broker and this benchmark process."""
    peaks = sampler.snapshot()
    totals: dict[str, float] = defaultdict(float)
    for pid, peak in peaks.items():
        if peak.alive and (seconds := _cpu_seconds(pid)) is not None:
            group = peak.label if peak.label.endswith("worker") else peak.service
            totals[group.replace("pool worker", "pool workers (codec)")] += seconds
    for pid in _broker_pids():
        totals[BROKER] += _cpu_seconds(pid) or 0.0
    own = os.times()
    totals[BENCH] += own.user + own.system
    return dict(totals)


def per_image_ms(
    before: dict[str, float], after: dict[str, float], images: int
) -> dict[str, float]:
    """Milliseconds of CPU per image in each group over a phase, largest first."""
    spent = {name: after[name] - before.get(name, 0.0) for name in after}
    return {
        name: 1000 * seconds / images
        for name, seconds in sorted(spent.items(), key=lambda item: -item[1])
    }
