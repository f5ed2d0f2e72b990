"""Relative Frobenius error of a factorization W ~ L R without forming L R.

||W - L R||^2 = ||W||^2 - 2 <L^T W, R> + <R, (L^T L) R>, the inner products summed in float64. The identity cancels:
when the error is small against ||W|| (or L is ill-conditioned, so that R is large), the round-off of G = L^T L and
L^T W (formed in their own precision) swamps it. `factor_relative_error` therefore bounds that round-off and falls back
to the direct computation, in float64 row blocks, whenever the identity cannot resolve the error to about 1 %.
"""

from __future__ import annotations

import torch

from .lstsq import gram as gram_of

__all__ = ["factor_relative_error", "frobenius_sq", "relative_error"]

# Use the identity only when its computed rel^2 exceeds this many times the round-off bound (i.e. ~1 % accuracy).
_TRUST_FACTOR = 100.0


def relative_error(W: torch.Tensor, W_hat: torch.Tensor, block_rows: int = 4096) -> torch.Tensor:
    """||W - W_hat||_F / ||W||_F computed in float64 row blocks (a 0-d float64 tensor)."""
    num = torch.zeros((), dtype=torch.float64, device=W.device)
    den = torch.zeros((), dtype=torch.float64, device=W.device)
    for i in range(0, W.shape[0], block_rows):
        w = W[i:i + block_rows].double()
        num += (w - W_hat[i:i + block_rows].double()).square().sum()
        den += w.square().sum()
    return (num / den.clamp_min(torch.finfo(torch.float64).tiny)).sqrt()


def _dot64(A: torch.Tensor, B: torch.Tensor, block_rows: int = 1024) -> torch.Tensor:
    """<A, B> accumulated in float64, a block of rows at a time (no full-size float64 copies)."""
    acc = torch.zeros((), dtype=torch.float64, device=A.device)
    for i in range(0, A.shape[0], block_rows):
        acc += (A[i:i + block_rows].double() * B[i:i + block_rows].double()).sum()
    return acc


def frobenius_sq(W: torch.Tensor) -> torch.Tensor:
    """||W||_F^2 accumulated in float64 (0-d tensor)."""
    return _dot64(W, W)


def _direct(W: torch.Tensor, L: torch.Tensor, R: torch.Tensor, block_rows: int = 2048) -> torch.Tensor:
    num = torch.zeros((), dtype=torch.float64, device=W.device)
    den = torch.zeros((), dtype=torch.float64, device=W.device)
    R64 = R.double()
    for i in range(0, W.shape[0], block_rows):
        w = W[i:i + block_rows].double()
        num += (w - L[i:i + block_rows].double() @ R64).square().sum()
        den += w.square().sum()
    return (num / den.clamp_min(torch.finfo(torch.float64).tiny)).sqrt()


def factor_relative_error(W: torch.Tensor, L: torch.Tensor, R: torch.Tensor, gram: torch.Tensor | None = None,
                          cross: torch.Tensor | None = None, direct_below: float = 1e-3) -> torch.Tensor:
    """||W - L R||_F / ||W||_F (0-d float64 tensor); reuses gram = L^T L and cross = L^T W when given.

    The identity is trusted only when its value clears the round-off bound eps * (2 ||L^T W|| ||R|| + ||G|| ||R||^2)
    by a wide margin and is at least `direct_below`; otherwise the error is computed directly (float64 row blocks).
    """
    if gram is None:
        gram = gram_of(L)
    if cross is None:
        cross = L.T @ W
    w2 = _dot64(W, W).clamp_min(torch.finfo(torch.float64).tiny)
    R64 = R.double()
    cross_term = _dot64(cross, R64)
    quad = _dot64(R64, gram.double() @ R64)
    rel2 = (w2 - 2 * cross_term + quad) / w2
    eps = max(torch.finfo(gram.dtype).eps, torch.finfo(cross.dtype).eps)
    r_norm = R64.norm()
    bound = eps * (2 * cross.double().norm() * r_norm + gram.double().norm() * r_norm.square()) / w2
    if bool(rel2 < _TRUST_FACTOR * bound) or bool(rel2 < direct_below**2):
        return _direct(W, L, R)
    return rel2.sqrt()
