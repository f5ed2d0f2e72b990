"""Bit allocation: exact at hull-prefix budgets, within the stated gap elsewhere (both against exhaustive search)."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from lplr_convert.math.allocate import BudgetError, allocate, lower_hull, rank_candidates


def _instance(rng: random.Random, tensors: int, per_tensor: int) -> list[list[tuple[int, float]]]:
    """Random candidates: bits 0..40 (repeats allowed), errors uniform, so hulls, dominated points and ties occur."""
    return [[(rng.randint(0, 40), rng.random()) for _ in range(per_tensor)] for _ in range(tensors)]


def _frontier(cands):
    """Exhaustive search: (bits, min error) over all combinations, as sorted arrays with the running minimum."""
    combos = sorted((sum(c[0] for c in pick), math.fsum(c[1] for c in pick)) for pick in itertools.product(*cands))
    bits, best, out = [], math.inf, []
    for b, e in combos:
        best = min(best, e)
        bits.append(b)
        out.append(best)
    return bits, out


def _optimum(frontier, budget: int) -> float:
    bits, best = frontier
    lo, hi = 0, len(bits)
    while lo < hi:  # last combination with bits <= budget
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if bits[mid] <= budget else (lo, mid)
    return best[lo - 1]


def test_against_exhaustive_search():
    rng = random.Random(0)
    exact_prefixes = 0
    for _ in range(150):
        cands = _instance(rng, tensors=rng.randint(1, 4), per_tensor=rng.randint(1, 5))
        frontier = _frontier(cands)
        for budget in range(frontier[0][0], frontier[0][-1] + 2):
            res = allocate(cands, budget)
            assert res.bits <= budget and res.bits == sum(c[i][0] for c, i in zip(cands, res.choice))
            assert res.error == pytest.approx(math.fsum(c[i][1] for c, i in zip(cands, res.choice)), abs=0)
            opt = _optimum(frontier, budget)
            # fsum of at most 4 terms against fsum of the same terms in another order: equal to ~1e-16.
            tol = 1e-12
            assert res.error >= opt - tol
            # The hull prefix is exactly optimal for its own total, over all candidates (not only hull points).
            assert res.hull_error == pytest.approx(_optimum(frontier, res.hull_bits), abs=tol)
            assert res.error <= res.hull_error + tol
            assert res.error - opt <= res.gap + tol
            exact_prefixes += res.hull_bits == budget
    assert exact_prefixes > 100  # the exactness check above ran on many prefix budgets


def test_greedy_alone_is_not_optimal_between_prefixes():
    """Why the guarantee is stated with a gap: with 10 bits, the hull greedy takes tensor 0's steep cheap step, after
    which tensor 1's 10-bit step no longer fits; the optimum spends all 10 bits on tensor 1."""
    cands = [[(0, 1.0), (1, 0.5)], [(0, 5.0), (10, 0.0)]]
    res = allocate(cands, 10)
    assert res.hull_bits == 1 and res.error == 5.5 and res.gap == 5.0
    assert _optimum(_frontier(cands), 10) == 1.0


def test_budget_equal_to_the_minimum_and_infeasible_budgets():
    cands = [[(8, 0.5), (4, 2.0), (4, 1.0), (6, 3.0)], [(3, 1.0), (9, 0.1)]]
    res = allocate(cands, 7)
    assert res.choice == (2, 0) and res.bits == 7 and res.error == 2.0  # cheapest, and the better of two 4-bit ones
    with pytest.raises(BudgetError) as info:
        allocate(cands, 6)
    assert info.value.minimum_bits == 7 and isinstance(info.value, ValueError) and "7 bits" in str(info.value)


def test_ties_are_deterministic():
    same = [(0, 4.0), (10, 1.0), (20, 0.0)]
    res = allocate([same, same, same], 10)
    assert res.choice == (1, 0, 0)  # equal slopes: the lowest tensor index moves first
    assert allocate([same, same, same], 20).choice == (1, 1, 0)
    twins = [(5, 1.0), (5, 1.0), (0, 2.0)]  # identical candidates: the lowest index
    assert allocate([twins], 5).choice == (0,)


def test_lower_hull():
    cands = [(0, 10.0), (1, 9.5), (2, 6.0), (3, 5.0), (4, 4.0), (5, 4.0), (6, 0.0), (2, 7.0)]
    # (1, 9.5) lies above the chord (0, 10) -> (2, 6); (3, 5) and (4, 4) above (2, 6) -> (6, 0); (5, 4) and (2, 7)
    # are dominated.
    assert lower_hull(cands) == [0, 2, 6]
    collinear = [(0, 3.0), (1, 2.0), (2, 1.0), (3, 0.0)]
    assert lower_hull(collinear) == [0, 1, 2, 3]  # straight edges keep their points


def test_thousand_tensors_of_a_hundred_candidates():
    rng = random.Random(1)
    cands = []
    for _ in range(1000):  # convex-ish rank curves with noise, as from spectra
        cands.append([(r * 1000, math.exp(-r / 20) + 0.01 * rng.random()) for r in range(100)])
    minimum = sum(min(b for b, _ in c) for c in cands)
    res = allocate(cands, minimum + 30_000_000)
    assert res.bits <= minimum + 30_000_000 and res.error <= res.hull_error


def test_rank_candidates_are_the_whitened_tails():
    sigma = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    got = rank_candidates(sigma, lambda r: 10 * r, range(5))
    assert got == [(0, 30.0), (10, 14.0), (20, 5.0), (30, 1.0), (40, 0.0)]
    assert rank_candidates(torch.tensor([1e8, 1.0]), lambda r: r, [1]) == [(1, 1.0)]  # no cancellation from 1e16
    with pytest.raises(ValueError, match="rank 5"):
        rank_candidates(sigma, lambda r: r, [5])
