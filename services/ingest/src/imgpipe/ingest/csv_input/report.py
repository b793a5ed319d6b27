"""The problems found in an upload so far, and the signal that reading must stop."""

from __future__ import annotations

from dataclasses import dataclass, field

from imgpipe.ingest.domain import Problem

MAX_LISTED_PROBLEMS = 1000


class Stop(Exception):
    """Parsing cannot go on (limit reached, binary data); carries the last problem."""

    def __init__(self, problem: Problem, too_large: bool) -> None:
        self.problem, self.too_large = problem, too_large


@dataclass
class Report:
    """Problems in the order found, one per (line, column, message), at most
    MAX_LISTED_PROBLEMS: one more stops the parse, so a broken file costs bounded work."""

    problems: list[Problem] = field(default_factory=list)
    total: int = 0
    _seen: set[tuple[int | None, str | None, str]] = field(default_factory=set)

    def add(self, problem: Problem) -> None:
        key = (problem.line, problem.column, problem.message)
        if key in self._seen:
            return
        if len(self.problems) >= MAX_LISTED_PROBLEMS:
            message = (
                "too many problems: reading stopped on this line; "
                f"the first {MAX_LISTED_PROBLEMS} are listed"
            )
            raise Stop(Problem(message, problem.line), too_large=False)
        self._seen.add(key)
        self.total += 1
        self.problems.append(problem)
