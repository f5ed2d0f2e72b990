"""Relative Frobenius error of a factorization W ~ L R without forming L R.

||W - L R||^2 = ||W||^2 - 2 <L^T W, R> + <R, (L^T L) R>, summed in float64. When the error is tiny the identity
suffers cancellation, so below `direct_below` (relative) the error is recomputed directly in row blocks.
"""

from __future__ import annotations

import torch

__all__ = ["relative_error", "factor_relative_error", "frobenius_sq"]


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
    for i in range(0, W.shape[0], block_rows):
        w = W[i:i + block_rows].double()
        num += (w - L[i:i + block_rows].double() @ R.double()).square().sum()
        den += w.square().sum()
    return (num / den.clamp_min(torch.finfo(torch.float64).tiny)).sqrt()


def factor_relative_error(W: torch.Tensor, L: torch.Tensor, R: torch.Tensor, gram: torch.Tensor | None = None,
                          cross: torch.Tensor | None = None, direct_below: float = 1e-2) -> torch.Tensor:
    """||W - L R||_F / ||W||_F (0-d float64 tensor); reuses gram = L^T L and cross = L^T W when given."""
    if gram is None:
        gram = L.T @ L
    if cross is None:
        cross = L.T @ W
    w2 = _dot64(W, W)
    cross_term = _dot64(cross, R)
    quad = _dot64(R, gram @ R)
    rel2 = ((w2 - 2 * cross_term + quad) / w2.clamp_min(torch.finfo(torch.float64).tiny)).clamp_min(0)
    if bool(rel2 < direct_below**2):
        return _direct(W, L, R)
    return rel2.sqrt()
