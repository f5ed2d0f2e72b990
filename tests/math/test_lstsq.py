"""Least squares without a pseudo-inverse: accuracy, rank-deficient and ill-conditioned L, reused products."""

from __future__ import annotations

import torch

from lplr_convert.math.lstsq import solve_normal


def _residual(L, W, R) -> float:
    return float((W.double() - L.double() @ R.double()).norm())


def _optimum(L, W) -> torch.Tensor:
    return torch.linalg.pinv(L.double()) @ W.double()


def test_well_conditioned_float32_matches_float64_lstsq(gen):
    L = torch.randn(300, 40, generator=gen)
    W = torch.randn(300, 120, generator=gen)
    sol = solve_normal(L, W)
    ref = torch.linalg.lstsq(L.double(), W.double()).solution
    assert sol.precision == "working" and sol.shift == 0.0 and sol.R.dtype == torch.float32
    assert float((sol.R.double() - ref).norm() / ref.norm()) < 1e-5
    assert torch.allclose(sol.gram, L.T @ L) and torch.allclose(sol.cross, L.T @ W)


def test_float64_input_is_solved_to_float64_accuracy(gen):
    L = torch.randn(200, 30, generator=gen, dtype=torch.float64)
    W = torch.randn(200, 50, generator=gen, dtype=torch.float64)
    sol = solve_normal(L, W)
    ref = torch.linalg.lstsq(L, W).solution
    assert sol.R.dtype == torch.float64
    assert float((sol.R - ref).norm() / ref.norm()) < 1e-11


def test_rank_deficient_L_gives_a_finite_least_squares_solution(gen):
    """Duplicated and proportional columns (exact in float32): Cholesky fails, the diagonal shift takes over."""
    for dtype in (torch.float32, torch.float64):
        L = torch.randn(300, 40, generator=gen, dtype=dtype)
        L[:, 5] = L[:, 3]
        L[:, 7] = 2 * L[:, 3]
        L[:, 30] = L[:, 12]
        W = torch.randn(300, 120, generator=gen, dtype=dtype)
        sol = solve_normal(L, W)
        assert torch.isfinite(sol.R).all()
        assert sol.shift > 0 and sol.precision == "float64"
        best = _optimum(L, W)
        assert _residual(L, W, sol.R) <= _residual(L, W, best) * (1 + 1e-6)
        # The shifted (ridge) solution is no longer than the minimum-norm one: no huge entries to quantize later.
        assert float(sol.R.double().norm()) <= float(best.norm()) * (1 + 1e-6)


def test_zero_L_gives_zero_R():
    sol = solve_normal(torch.zeros(20, 4), torch.ones(20, 6))
    assert torch.equal(sol.R, torch.zeros(4, 6))


def test_ill_conditioned_L_is_reformed_in_float64(gen, spectrum):
    """Known behaviour: float32 normal equations lose accuracy when cond(L) is large; solve_normal re-forms them in
    float64 then. The naive float32 solve is shown to be worse, so this test fails if the fallback goes away."""
    m, r, n = 300, 40, 120
    L = spectrum(m, r, torch.logspace(0, -4, r, dtype=torch.float64), seed=3)  # cond(L) = 1e4
    W = (L.double() @ torch.randn(r, n, generator=gen, dtype=torch.float64)
         + 1e-3 * torch.randn(m, n, generator=gen, dtype=torch.float64)).float()
    best = _residual(L, W, _optimum(L, W))
    sol = solve_normal(L, W)
    assert sol.precision == "float64" and sol.gram.dtype == torch.float64 and sol.cross.dtype == torch.float64
    assert _residual(L, W, sol.R) <= best * (1 + 1e-6)
    naive = torch.linalg.solve(L.T @ L, L.T @ W)  # float32 normal equations
    assert _residual(L, W, naive) > best * (1 + 1e-4)


def test_block_triangular_gram_equals_full_product():
    from lplr_convert.math.lstsq import gram

    L = torch.randn(300, 1100, generator=torch.Generator().manual_seed(5))
    full = L.T @ L
    G = gram(L)
    assert torch.allclose(G, full, rtol=1e-5, atol=1e-3)
    assert torch.equal(G, G.T)
