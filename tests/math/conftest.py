"""Fixtures for the numerical-kernel tests: seeded generators and matrices with a known spectrum."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def gen() -> torch.Generator:
    """A CPU generator with a fixed seed (each test gets a fresh one)."""
    return torch.Generator().manual_seed(1234)


def _spectrum_matrix(m: int, n: int, sigma: torch.Tensor, seed: int = 0, dtype: torch.dtype = torch.float32):
    """An m x n matrix U diag(sigma) V^T with random orthonormal U, V and the given singular values (float64 built)."""
    g = torch.Generator().manual_seed(seed)
    k = sigma.numel()
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return ((U * sigma.double()) @ V.T).to(dtype)


@pytest.fixture
def decaying() -> torch.Tensor:
    """A 150 x 90 float32 matrix with singular values 0.85^i (a clearly decaying spectrum)."""
    return _spectrum_matrix(150, 90, 0.85 ** torch.arange(90, dtype=torch.float64), seed=7)


@pytest.fixture
def spectrum():
    """Factory: spectrum(m, n, sigma, seed=0, dtype=float32) -> U diag(sigma) V^T."""
    return _spectrum_matrix
