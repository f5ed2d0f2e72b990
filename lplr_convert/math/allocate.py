"""A global bit budget: one (stored_bits, error) candidate per tensor, total bits <= budget, total error small.

Greedy on each tensor's lower convex hull: start every tensor at its cheapest candidate and repeatedly take the hull
step with the largest error decrease per bit, while it fits. Hull slopes decrease along each tensor, so the steps are
taken in globally non-increasing order of slope; the allocation reached when the first step does not fit (the "hull
prefix", total bits B_h) minimises sum(error) + lambda * sum(bits) for lambda between the last step taken and the one
that failed, which makes it exactly optimal among all allocations of all candidates with at most B_h bits (the
Lagrangian / convex-hull argument of Shoham and Gersho 1988). For a budget B > B_h that is not a prefix total the
problem is a multiple-choice knapsack (NP-hard); the greedy then goes on with the hull steps that still fit (a tensor
whose next step does not fit stays), and a final pass spends what is left on the single moves (to any candidate,
hull or not) that fit with the largest error decrease, repeatedly. Guarantee (tested against brute force): the result
fits, its error is <= the prefix's, and it exceeds the optimum for B by at most `gap`, the error decrease of the first
hull step that did not fit.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["Allocation", "BudgetError", "allocate", "lower_hull", "rank_candidates"]

Candidate = tuple[int, float]  # (stored bits, error)


class BudgetError(ValueError):
    """The budget is below the sum of every tensor's cheapest candidate; `minimum_bits` is the smallest feasible one."""

    def __init__(self, budget: int, minimum_bits: int) -> None:
        super().__init__(f"a bit budget of {budget} is below the smallest reachable total of {minimum_bits} bits")
        self.budget = budget
        self.minimum_bits = minimum_bits


@dataclass(frozen=True)
class Allocation:
    """`choice[t]` indexes tensor t's candidate list. `hull_bits`/`hull_error` describe the hull prefix (optimal for
    a budget of hull_bits); error - optimum(budget) <= hull_error - optimum(budget) <= gap."""

    choice: tuple[int, ...]
    bits: int
    error: float
    hull_bits: int
    hull_error: float
    gap: float


def lower_hull(candidates: Sequence[Candidate]) -> list[int]:
    """Indices of the lower convex hull of the Pareto front, by increasing bits and strictly decreasing error.

    The first index is the cheapest candidate (lowest error among equally cheap ones; ties by index). Points on a
    straight hull edge are kept (finer steps to fill a budget with; they change no slope).
    """
    order = sorted(range(len(candidates)), key=lambda i: (candidates[i][0], candidates[i][1], i))
    hull: list[int] = []
    for i in order:
        b, e = candidates[i]
        if hull and e >= candidates[hull[-1]][1]:  # dominated: no cheaper in bits, no better in error
            continue
        while len(hull) >= 2:
            (b0, e0), (b1, e1) = candidates[hull[-2]], candidates[hull[-1]]
            if (e1 - e0) * (b - b1) <= (e - e1) * (b1 - b0):  # slope(0,1) <= slope(1,new): convex, keep
                break
            hull.pop()
        hull.append(i)
    return hull


def _slope(candidates: Sequence[Candidate], a: int, b: int) -> float:
    """Error decrease per bit from candidate a to candidate b (positive along a hull)."""
    return (candidates[a][1] - candidates[b][1]) / (candidates[b][0] - candidates[a][0])


def _hull_greedy(cands: Sequence[Sequence[Candidate]], hulls: list[list[int]],
                 budget: int) -> tuple[list[int], list[int], float]:
    """Hull positions of the greedy prefix, the error decrease of the first step that did not fit (0 if none), and
    the positions after continuing past it: a tensor whose next step does not fit stays where it is, the others go
    on in slope order."""
    pos = [0] * len(hulls)
    total = sum(cands[t][h[0]][0] for t, h in enumerate(hulls))
    heap = [(-_slope(cands[t], h[0], h[1]), t) for t, h in enumerate(hulls) if len(h) > 1]
    heapq.heapify(heap)  # ties: the lower tensor index first
    prefix, gap = None, 0.0
    while heap:
        t = heapq.heappop(heap)[1]
        h, k = hulls[t], pos[t]
        step = cands[t][h[k + 1]][0] - cands[t][h[k]][0]
        if total + step > budget:
            if prefix is None:
                prefix, gap = list(pos), cands[t][h[k]][1] - cands[t][h[k + 1]][1]
            continue
        total += step
        pos[t] = k + 1
        if k + 2 < len(h):
            heapq.heappush(heap, (-_slope(cands[t], h[k + 1], h[k + 2]), t))
    return (pos if prefix is None else prefix), pos, gap


def _fill(cands: Sequence[Sequence[Candidate]], choice: list[int], budget: int) -> list[int]:
    """Spend leftover bits: repeatedly apply the single candidate change (any tensor, any candidate) that fits and
    lowers the error most; ties go to the lowest (tensor, candidate) index. Each pass is vectorised over all
    candidates; the error strictly decreases every pass, so it terminates."""
    width = max(len(c) for c in cands)
    bits = torch.full((len(cands), width), torch.iinfo(torch.int64).max // 4, dtype=torch.int64)
    err = torch.full((len(cands), width), math.inf, dtype=torch.float64)
    for t, c in enumerate(cands):
        bits[t, :len(c)] = torch.tensor([b for b, _ in c], dtype=torch.int64)
        err[t, :len(c)] = torch.tensor([e for _, e in c], dtype=torch.float64)
    cur = torch.tensor(choice, dtype=torch.int64)
    rows = torch.arange(len(cands))
    while True:
        cur_bits, cur_err = bits[rows, cur], err[rows, cur]
        left = budget - int(cur_bits.sum())
        gain = torch.where((bits - cur_bits[:, None] <= left), err - cur_err[:, None], math.inf)
        flat = int(torch.argmin(gain))  # the first minimum: lowest tensor, then lowest candidate index
        if not gain.view(-1)[flat] < 0:
            return cur.tolist()
        cur[flat // width] = flat % width


def allocate(candidates: Sequence[Sequence[Candidate]], budget: int) -> Allocation:
    """Choose one (stored_bits, error) candidate per tensor with sum(bits) <= budget and small sum(error).

    Exactly optimal when the budget is a hull-prefix total; otherwise within `gap` of the optimum (module docstring).
    BudgetError (a ValueError carrying `minimum_bits`) when even the cheapest candidates exceed the budget. Pure Python
    with a heap plus a vectorised fill pass: 1000 tensors x 100 candidates take ~0.1 s here.
    """
    if not candidates or any(len(c) == 0 for c in candidates):
        raise ValueError("every tensor needs at least one candidate")
    cands = [[(int(b), float(e)) for b, e in c] for c in candidates]
    if not all(b >= 0 and math.isfinite(e) for c in cands for b, e in c):
        raise ValueError("candidate bits must be non-negative and errors finite")
    hulls = [lower_hull(c) for c in cands]
    minimum = sum(c[h[0]][0] for c, h in zip(cands, hulls))
    if minimum > budget:
        raise BudgetError(budget, minimum)
    prefix_pos, pos, gap = _hull_greedy(cands, hulls, budget)
    prefix = [h[k] for h, k in zip(hulls, prefix_pos)]
    choice = _fill(cands, [h[k] for h, k in zip(hulls, pos)], budget)
    return Allocation(tuple(choice), sum(c[i][0] for c, i in zip(cands, choice)),
                      math.fsum(c[i][1] for c, i in zip(cands, choice)), sum(c[i][0] for c, i in zip(cands, prefix)),
                      math.fsum(c[i][1] for c, i in zip(cands, prefix)), gap)


def rank_candidates(sigma: torch.Tensor, bits_for_rank: Callable[[int], int],
                    ranks: Iterable[int]) -> list[Candidate]:
    """(bits_for_rank(r), sum_{i>r} sigma_i^2) for each rank r: given the singular values of the whitened W S, the
    output error of the best unquantized rank-r approximation (exact when S S^T = H, see `whiten`). Tail sums in
    float64, accumulated from the smallest sigma up (no cancellation); one host sync."""
    s2 = sigma.detach().double().square().flip(0)
    tails = torch.cat([s2.new_zeros(1), s2.cumsum(0)]).flip(0).tolist()  # tails[r] = sum_{i >= r} sigma_i^2
    out = []
    for r in ranks:
        if not 0 <= r < len(tails):
            raise ValueError(f"rank {r} is outside 0..{len(tails) - 1} for {len(tails) - 1} singular values")
        out.append((int(bits_for_rank(r)), tails[r]))
    return out
