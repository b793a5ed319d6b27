"""The results: one table on stdout, the same figures in results.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from memory import ProcessPeak

Row = tuple[str, str]


def memory_table(snapshots: dict[str, dict[int, ProcessPeak]]) -> list[dict[str, Any]]:
    """One entry per process: its label and its peak at the end of each phase (KiB)."""
    processes: dict[int, dict[str, Any]] = {}
    for phase, snapshot in snapshots.items():
        for pid, peak in snapshot.items():
            entry = processes.setdefault(pid, {"pid": pid, "process": peak.label, "peak_kib": {}})
            entry["peak_kib"][phase] = peak.peak_kib
    return list(processes.values())


def _mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.0f}"


def section(title: str, rows: list[Row]) -> list[str]:
    width = max((len(label) for label, _ in rows), default=0)
    return [title] + [f"  {label:<{width}}  {value}" for label, value in rows] + [""]


def _memory_lines(memory: list[dict[str, Any]], phases: list[str]) -> list[str]:
    width = max([len(f"{m['process']} ({m['pid']})") for m in memory] + [10])
    header = f"  {'process (pid)':<{width}}" + "".join(f"  {p:>14}" for p in phases)
    lines = ["Peak memory, VmHWM in MiB, at the end of each phase", header]
    for entry in memory:
        label = f"{entry['process']} ({entry['pid']})"
        cells = "".join(f"  {_mib(entry['peak_kib'].get(p)):>14}" for p in phases)
        lines.append(f"  {label:<{width}}{cells}")
    return lines


def render(results: dict[str, Any]) -> str:
    lines = [f"imgpipe benchmark - {results['machine']}", ""]
    lines += section("Throughput (images per second)", results["table"]["throughput"])
    lines += section(
        "Output formats, quality 50 (codec only, in the codec limit's pool)",
        results["table"]["formats"],
    )
    lines += section("Upload", results["table"]["upload"])
    lines += section("Status reads", results["table"]["status"])
    lines += section("CPU per image in ms, by process", results["table"]["cpu"])
    if results["table"].get("bookkeeping"):
        lines += section(
            "Bookkeeping: tiny images, the pipeline's own work as requests grow",
            results["table"]["bookkeeping"],
        )
    lines += _memory_lines(results["memory"], list(results["memory_phases"]))
    return "\n".join(lines)


def write(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
