"""Results of jobs that finish in any order, yielded in job order with a bounded number of jobs under way."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypeVar

R = TypeVar("R")

__all__ = ["in_order"]


def in_order(n_jobs: int, start: Callable[[int], bool], finished: Callable[[], list[tuple[int, R]]],
             ahead: int) -> Iterator[R]:
    """Yield the results of jobs 0..n_jobs-1 in order.

    `start(i)` starts job i and returns False (starting nothing) when no worker is free; `finished()` blocks until at
    least one started job is done and returns [(index, result)]. At most `ahead` jobs are started but not yet
    yielded, so at most that many results wait in memory, however unevenly the jobs take.
    """
    if ahead < 1:
        raise ValueError(f"ahead must be at least 1, got {ahead}")
    done: dict[int, R] = {}
    started = nxt = 0
    while nxt < n_jobs:
        while started < n_jobs and started - nxt < ahead and start(started):
            started += 1
        if nxt not in done:
            for i, result in finished():
                done[i] = result
        while nxt in done:
            yield done.pop(nxt)
            nxt += 1
