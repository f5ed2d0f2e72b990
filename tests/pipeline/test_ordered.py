"""Results finishing in any order come out in job order, with never more than `ahead` jobs under way or waiting."""

from __future__ import annotations

import random

import pytest

from lplr_convert.pipeline.executors.ordered import in_order


@pytest.mark.parametrize("ahead,slots", [(1, 1), (2, 2), (4, 2), (6, 3)])
def test_any_finishing_order_yields_job_order_within_the_bound(ahead, slots):
    rng = random.Random(ahead * 10 + slots)
    running: list[int] = []
    outstanding = {"max": 0, "now": 0}  # started and not yet yielded

    def start(i):
        if len(running) >= slots:
            return False
        running.append(i)
        outstanding["now"] += 1
        outstanding["max"] = max(outstanding["max"], outstanding["now"])
        return True

    def finished():
        i = running.pop(rng.randrange(len(running)))  # an arbitrary running job finishes
        return [(i, f"result {i}")]

    got = []
    for r in in_order(40, start, finished, ahead):
        outstanding["now"] -= 1
        got.append(r)
    assert got == [f"result {i}" for i in range(40)]
    assert outstanding["max"] <= ahead
    assert not running


def test_no_jobs_and_a_bad_bound():
    assert list(in_order(0, lambda i: True, list, 2)) == []
    with pytest.raises(ValueError):
        list(in_order(3, lambda i: True, list, 0))
