"""W ~ Q + L R: a full-size quantized backbone plus a quantized low-rank correction, fitted against H = E[x x^T].

The alternation of CALDERA (Saha et al. 2024) and LoftQ (H = I): Q = quantize_q(W - L R, H), then (L, R) a low-rank fit
of the residual W - Q in the whitened space (whitened SVD, then LPLR-style refits with quantized factors). Every
candidate is scored by the output error tr(D H D^T) with the H given and the best one is kept; the rank-0 candidate
(Q = quantize_q(W, H), L R = 0) is among them, so the result is never worse than the backbone alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .lstsq import solve_normal
from .svd import truncated_svd
from .weighted import weighted_error
from .whiten import Whitening, whitening, work_dtype

__all__ = ["LowRank", "QLRResult", "Quantizer", "factored_weighted_error", "fit_low_rank", "qlr"]

# quantize(M, H_M) -> (stored form, dequantized M) for a matrix M whose inputs have second moment H_M.
Quantizer = Callable[[torch.Tensor, torch.Tensor], tuple[Any, torch.Tensor]]

_BLOCK_ELEMENTS = 1 << 20


@dataclass
class QLRResult:
    """The kept iterate: stored forms and dequantized values of Q (m x n), L (m x rank) and R (rank x n), its weighted
    relative error sqrt(tr(D H D^T) / tr(W H W^T)), and that error for every candidate in the order they were formed:
    [rank 0, then per iteration: after the L R fit, after the Q update]. `best` indexes `history`."""

    q_stored: Any
    Q: torch.Tensor
    l_stored: Any
    r_stored: Any
    L: torch.Tensor
    R: torch.Tensor
    error: float
    history: list[float] = field(default_factory=list)
    best: int = 0


def factored_weighted_error(E: torch.Tensor, L: torch.Tensor | None, R: torch.Tensor | None,
                            H: torch.Tensor) -> torch.Tensor:
    """tr((E - L R) H (E - L R)^T) as a 0-d float64 tensor, forming L R one block of rows at a time (never m x n);
    `weighted_error` of each block (L R also in float64), so the same arithmetic. L = R = None: the error of E."""
    H64 = H.to(torch.float64)
    if L is None or L.shape[1] == 0:
        return weighted_error(E, torch.zeros((), dtype=E.dtype, device=E.device).expand_as(E), H64)
    acc = torch.zeros((), dtype=torch.float64, device=E.device)
    R64 = R.double()
    step = max(1, _BLOCK_ELEMENTS // max(1, E.shape[1]))
    for i in range(0, E.shape[0], step):
        acc += weighted_error(E[i:i + step], L[i:i + step].double() @ R64, H64)
    return acc


@dataclass
class LowRank:
    """A quantized low-rank fit: stored and dequantized factors, and the fit's own objective."""

    l_stored: Any
    r_stored: Any
    L: torch.Tensor
    R: torch.Tensor
    score: float  # ||(E - L R) S||_F^2, the fit's own objective


def _whitened_residual_sq(A: torch.Tensor, L: torch.Tensor, B: torch.Tensor) -> float:
    """||A - L B||_F^2 in float64 row blocks (A = E S, B = R S), one host sync."""
    acc = torch.zeros((), dtype=torch.float64, device=A.device)
    B64 = B.double()
    step = max(1, _BLOCK_ELEMENTS // max(1, A.shape[1]))
    for i in range(0, A.shape[0], step):
        acc += (A[i:i + step].double() - L[i:i + step].double() @ B64).square().sum()
    return float(acc)


def fit_low_rank(E: torch.Tensor, H: torch.Tensor, white: Whitening, rank: int, quantize_l: Quantizer,
                 quantize_r: Quantizer, refits: int = 2, svd_method: str = "auto", seed: int = 0,
                 init_left: torch.Tensor | None = None) -> LowRank:
    """Quantized rank-`rank` fit of the residual E (LPLR in the whitened space), best of `refits` rounds.

    Round 1 starts from `init_left` when given (e.g. a whitened sketch basis, as LPLR's), else from the whitened SVD
    (L = U Sigma, the optimal L for its R, so R H R^T = I there); later rounds
    refit L by weighted least squares against the quantized R. Each round quantizes L against R H R^T (exact: the
    output error grows by tr((L* - L_q) R H R^T (L* - L_q)^T) for the weighted-optimal L*), refits R by unweighted least
    squares against the quantized L (optimal for any H, see `whiten`) and quantizes R against H.
    """
    A = white.apply(E)
    if init_left is None:
        U, s, _ = truncated_svd(A, rank, svd_method, seed=seed)
        L = U.mul_(s)
        del U
    else:
        L = init_left
    R = solve_normal(L, E).R
    best: LowRank | None = None
    for j in range(refits):
        B = white.apply(R)
        if j:  # min_L ||A - L B||_F, B = R S: least squares on the transposed problem
            L = solve_normal(B.T, A.T).R.T
        l_stored, Lq = quantize_l(L, (B @ B.T).to(H.dtype))  # B B^T = R (H + shift I) R^T
        R = solve_normal(Lq.to(E.dtype), E).R
        r_stored, R = quantize_r(R, H)
        score = _whitened_residual_sq(A, Lq, white.apply(R))
        if best is None or score < best.score:
            best = LowRank(l_stored, r_stored, Lq, R, score)
    return best


def _check(W: torch.Tensor, H: torch.Tensor, rank: int, iters: int, refits: int) -> None:
    m, n = W.shape
    if H.shape != (n, n):
        raise ValueError(f"H must be {n}x{n} for a {m}x{n} weight, got {tuple(H.shape)}")
    if not 0 <= rank <= min(m, n):
        raise ValueError(f"rank {rank} is outside 0..{min(m, n)} for a {m}x{n} matrix")
    if iters < 1 or refits < 1:
        raise ValueError(f"iters ({iters}) and refits ({refits}) must be at least 1")


def qlr(W: torch.Tensor, H: torch.Tensor, rank: int, quantize_q: Quantizer, quantize_l: Quantizer,
        quantize_r: Quantizer, *, iters: int = 2, refits: int = 2, seed: int = 0, svd_method: str = "auto",
        white: Whitening | None = None, q0: tuple[Any, torch.Tensor] | None = None) -> QLRResult:
    """W ~ Q + L R minimising tr((W - Q - L R) H (W - Q - L R)^T); the best of 1 + 2 * iters candidates.

    `quantize_q(M, H)` quantizes a full-size m x n matrix against H (e.g. GPTQ), `quantize_l(L, R H R^T)` and
    `quantize_r(R, H)` the factors against their own inputs' second moments (L's input is R x); each returns
    (stored form, dequantized matrix). Candidates: Q_0 = quantize_q(W, H) with L R = 0 (returned exactly, stored form
    included, for rank 0); then per iteration the quantized low-rank fit of W - Q (`fit_low_rank`, `refits` rounds,
    SVD route `svd_method` seeded with `seed`) and the update Q = quantize_q(W - L R, H). Errors are computed in float64
    against the H given; `white` (whitening of H) may be passed to share it between weights with the same inputs.
    Computed in W's working precision (float32, or float64), on W's device; one host sync per candidate. `q0`: the
    first backbone quantize_q(W, H) when it is already known (e.g. from a budget's first pass), not recomputed.
    """
    _check(W, H, rank, iters, refits)
    m, n = W.shape
    Wf = W.to(work_dtype(W.dtype))
    den = float(factored_weighted_error(Wf, None, None, H))
    q_stored, Q = quantize_q(W, H) if q0 is None else q0
    E = Wf - Q.to(Wf.dtype)
    empty_l, empty_r = Wf.new_zeros(m, 0), Wf.new_zeros(0, n)
    best = QLRResult(q_stored, Q, None, None, empty_l, empty_r, _relative(factored_weighted_error(E, None, None, H), den))
    best.history.append(best.error)
    if rank == 0:
        return best
    white = whitening(H) if white is None else white
    for _ in range(iters):
        lr = fit_low_rank(E, H, white, rank, quantize_l, quantize_r, refits, svd_method, seed)
        best = _keep(best, q_stored, Q, lr, _relative(factored_weighted_error(E, lr.L, lr.R, H), den))
        q_stored, Q = quantize_q(Wf - lr.L.to(Wf.dtype) @ lr.R.to(Wf.dtype), H)
        E = Wf - Q.to(Wf.dtype)
        best = _keep(best, q_stored, Q, lr, _relative(factored_weighted_error(E, lr.L, lr.R, H), den))
    return best


def _relative(err: torch.Tensor, den: float) -> float:
    """sqrt(err / den), with a round-off-negative err clamped at 0 and 0 / 0 = 0 (H = 0)."""
    return (max(float(err), 0.0) / max(den, torch.finfo(torch.float64).tiny)) ** 0.5


def _keep(best: QLRResult, q_stored: Any, Q: torch.Tensor, lr: LowRank, error: float) -> QLRResult:
    """Record a candidate's error; it replaces the kept iterate only if strictly better (ties keep the earlier)."""
    best.history.append(error)
    if error < best.error:
        return QLRResult(q_stored, Q, lr.l_stored, lr.r_stored, lr.L, lr.R, error, best.history, len(best.history) - 1)
    return best
