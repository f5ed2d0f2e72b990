"""Helpers for the calibration-aware kernel tests: synthetic second moments H = E[x x^T] and brute-force references."""

from __future__ import annotations

import torch


def random_hessian(n: int, seed: int, samples: int | None = None, dead: tuple[int, ...] = ()) -> torch.Tensor:
    """H = X^T X / N (float64) for N correlated activations with spread channel scales and a non-zero mean (as
    transformer activations have); the `dead` inputs are always zero, so their rows and columns of H vanish."""
    g = torch.Generator().manual_seed(seed)
    N = samples or 4 * n
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
    scales = torch.randn(n, generator=g, dtype=torch.float64).exp()
    X = (torch.randn(N, n, generator=g, dtype=torch.float64) @ mix + 0.5) * scales
    X[:, list(dead)] = 0
    return X.T @ X / N


def weighted_sq(D: torch.Tensor, H: torch.Tensor) -> float:
    """tr(D H D^T) by the plain float64 formula (the reference for the blocked kernels)."""
    D = D.double()
    return float(torch.trace(D @ H.double() @ D.T))


def als_best(W: torch.Tensor, H: torch.Tensor, r: int, seeds: int = 20, iters: int = 200) -> float:
    """Brute force: the smallest tr(D H D^T) that alternating weighted least squares reaches from `seeds` random
    starts (L given R: L = W H R^T (R H R^T)^-1; R given L: the least-squares R), float64."""
    W, H = W.double(), H.double()
    best = float("inf")
    for seed in range(seeds):
        g = torch.Generator().manual_seed(seed)
        R = torch.randn(r, W.shape[1], generator=g, dtype=torch.float64)
        for _ in range(iters):
            L = torch.linalg.solve(R @ H @ R.T, R @ H @ W.T).T
            R = torch.linalg.lstsq(L, W).solution
        best = min(best, weighted_sq(W - L @ R, H))
    return best
