"""The error of W ~ L R from the identity ||W||^2 - 2<L^T W, R> + <R, L^T L R>, checked against the direct value."""

from __future__ import annotations

import pytest
import torch

from lplr_convert.math.error import factor_relative_error, frobenius_sq, relative_error
from lplr_convert.math.lstsq import solve_normal


def _direct(W, L, R) -> float:
    W64 = W.double()
    return float((W64 - L.double() @ R.double()).norm() / W64.norm())


def test_relative_error_and_frobenius(gen):
    W = torch.randn(5000, 30, generator=gen)  # more rows than one block
    W_hat = W + 0.1 * torch.randn(5000, 30, generator=gen)
    assert float(relative_error(W, W_hat)) == pytest.approx(_direct(W, W_hat, torch.eye(30)), rel=1e-12)
    # float32 block sums (cascade summation) accumulated in float64: a few float32 ulps at most
    assert float(frobenius_sq(W)) == pytest.approx(float(W.double().square().sum()), rel=1e-6)


def test_large_error_regime_uses_the_identity(gen):
    """W = L R0 + noise as large as L R0 (error about 0.7): the identity is well-conditioned and exact here."""
    L = torch.randn(400, 30, generator=gen)
    R = torch.randn(30, 150, generator=gen)
    W = L @ R + 5.5 * torch.randn(400, 150, generator=gen)
    expected = _direct(W, L, R)
    assert 0.5 < expected < 0.9
    got = factor_relative_error(W, L, R)
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(expected, rel=1e-5)
    # Given float64 products are really used (a wrong cross term changes the answer), and are exact.
    gram, cross = L.double().T @ L.double(), L.double().T @ W.double()
    assert float(factor_relative_error(W, L, R, gram, cross)) == pytest.approx(expected, rel=1e-9)
    assert float(factor_relative_error(W, L, R, gram, 1.1 * cross)) < 0.95 * expected


def test_quantization_regime_with_products_from_solve_normal(gen):
    """The LPLR use: R refit in least squares then perturbed (as quantization does); error about 0.3."""
    W = torch.randn(300, 200, generator=gen)
    L = W @ torch.randn(200, 60, generator=gen) / 60**0.5
    sol = solve_normal(L, W)
    R = sol.R + 0.01 * torch.randn_like(sol.R)
    assert float(factor_relative_error(W, L, R, sol.gram, sol.cross)) == pytest.approx(_direct(W, L, R), rel=1e-4)


@pytest.mark.parametrize("noise", [1e-3, 1e-5, 1e-7])
def test_tiny_error_regime_matches_the_direct_value(gen, noise):
    """W = L R + tiny noise: the identity alone would cancel to garbage in float32; the result must not."""
    L = torch.randn(300, 40, generator=gen)
    R = torch.randn(40, 100, generator=gen)
    W = L @ R + noise * torch.randn(300, 100, generator=gen)
    gram, cross = L.T @ L, L.T @ W  # float32 products, as the working-precision solve produces them
    expected = _direct(W, L, R)
    assert float(factor_relative_error(W, L, R, gram, cross)) == pytest.approx(expected, rel=1e-2)
    assert float(factor_relative_error(W, L, R)) == pytest.approx(expected, rel=1e-2)
    # The naive identity with these float32 products is off by far more than 1 % (what the fallback is for).
    w2 = W.double().square().sum()
    naive2 = (w2 - 2 * (cross.double() * R.double()).sum() + (R.double() * (gram @ R).double()).sum()) / w2
    assert abs(float(naive2.clamp_min(0).sqrt()) - expected) > 0.01 * expected


def test_ill_conditioned_L_does_not_fool_the_identity(gen, spectrum):
    """cond(L) = 1e5 makes R large and <R, G R> cancel badly in float32 even at a moderate error."""
    L = spectrum(200, 30, torch.logspace(0, -5, 30, dtype=torch.float64), seed=2)
    W = torch.randn(200, 80, generator=gen)
    R = torch.linalg.lstsq(L.double(), W.double()).solution.float()
    expected = _direct(W, L, R)
    assert float(factor_relative_error(W, L, R, L.T @ L, L.T @ W)) == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("noise", [0.3, 1e-2, 1e-6])
def test_cholesky_form_with_the_solve_products_matches_the_direct_value(gen, noise):
    """The LPLR fast path: <R, G R> as ||C^T R||^2 with the solve's own C; rank 1100 takes the blocked product."""
    W = torch.randn(1300, 1200, generator=gen)
    L = W @ torch.randn(1200, 1100, generator=gen) / 1100**0.5
    sol = solve_normal(L, W)
    assert sol.precision == "working" and sol.chol is not None
    R = sol.R + noise * sol.R.std() * torch.randn(sol.R.shape, generator=gen)
    expected = _direct(W, L, R)
    got = factor_relative_error(W, L, R, cross=sol.cross, chol=sol.chol)
    assert float(got) == pytest.approx(expected, rel=1e-2 if noise < 1e-3 else 1e-4)
    # C is really used: a 1 % larger C gives a visibly different (wrong) answer in the identity regime.
    if noise == 0.3:
        wrong = factor_relative_error(W, L, R, cross=sol.cross, chol=1.01 * sol.chol)
        assert abs(float(wrong) - expected) > 1e-3 * expected
