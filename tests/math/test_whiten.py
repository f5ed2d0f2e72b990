"""Whitening and whitened low-rank factors: exact Eckart-Young in the whitened space, robust on singular H."""

from __future__ import annotations

import pytest
import torch
from calib_testing import als_best, random_hessian, weighted_sq

from lplr_convert.math.lstsq import solve_normal
from lplr_convert.math.sketch import sketch_matrix
from lplr_convert.math.svd import truncated_svd
from lplr_convert.math.weighted import weighted_error, weighted_relative_error
from lplr_convert.math.whiten import (
    DEFAULT_EPS,
    whitened_singular_values,
    whitened_sketch_basis,
    whitened_svd,
    whitening,
)


def _tail(W: torch.Tensor, S: torch.Tensor, r: int) -> float:
    """sum_{i>r} sigma_i(W S)^2 by LAPACK in float64 (the Eckart-Young optimum of the whitened problem)."""
    return float(torch.linalg.svdvals(W.double() @ S.double())[r:].square().sum())


def test_whitening_of_a_definite_hessian_is_its_cholesky_factor():
    H = random_hessian(12, seed=1)
    w = whitening(H)
    assert w.shift == 0.0 and w.S.dtype == torch.float64
    assert torch.equal(w.S, w.S.tril())
    # S S^T reproduces H to float64 round-off of a Cholesky factorization (~n * eps64 * ||H||).
    assert torch.allclose(w.S @ w.S.T, H, rtol=0, atol=1e-13 * float(H.abs().max()))
    X = torch.randn(5, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(w.solve(w.apply(X)), X, atol=1e-10)  # cond(S) ~ 1e2 here: round trip to ~1e-14


@pytest.mark.parametrize("route", ["exact", "gram"])
@pytest.mark.parametrize("shape", [(30, 20), (20, 30)], ids=["tall", "wide"])
def test_whitened_svd_error_is_the_whitened_tail(route, shape):
    m, n = shape
    g = torch.Generator().manual_seed(2)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    H = random_hessian(n, seed=3)
    w = whitening(H)
    for r in (1, 5, 12):
        L, R = whitened_svd(W, w, r, route)
        assert L.shape == (m, r) and R.shape == (r, n)
        got = float(weighted_error(W, L @ R, H))
        # float64 throughout with cond(S) ~ 1e2: agreement to ~1e-12 relative; 1e-9 leaves room for the Gram route.
        assert got == pytest.approx(_tail(W, w.S, r), rel=1e-9)
        assert got == pytest.approx(weighted_sq(W - L @ R, H), rel=1e-9)


def test_nothing_found_by_brute_force_beats_it():
    g = torch.Generator().manual_seed(4)
    W = torch.randn(7, 6, generator=g, dtype=torch.float64)
    H = random_hessian(6, seed=5)
    r = 2
    L, R = whitened_svd(W, whitening(H), r, "exact")
    opt = weighted_sq(W - L @ R, H)
    brute = als_best(W, H, r)
    assert brute >= opt * (1 - 1e-9)  # float64 round-off of two independent computations
    assert brute == pytest.approx(opt, rel=1e-6)  # the brute force is strong enough to have found the optimum
    U, s, Vh = truncated_svd(W, r, "exact")
    assert weighted_sq(W - (U * s) @ Vh, H) > 1.05 * opt  # and the plain SVD is clearly not it


def test_identity_hessian_is_the_plain_truncated_svd(decaying):
    W = decaying.double()
    w = whitening(torch.eye(W.shape[1], dtype=torch.float64))
    assert w.shift == 0.0 and torch.equal(w.S, torch.eye(W.shape[1], dtype=torch.float64))
    U, s, Vh = truncated_svd(W, 10, "exact")
    L, R = whitened_svd(W, w, 10, "exact")
    assert torch.allclose(L, U * s, atol=1e-12) and torch.allclose(R, Vh, atol=1e-10)


def test_least_squares_refit_minimises_the_weighted_objective():
    """argmin_R ||(W - L R) S||_F solved as one big least-squares problem in vec(R) equals the unweighted refit."""
    g = torch.Generator().manual_seed(6)
    W = torch.randn(9, 7, generator=g, dtype=torch.float64)
    L = torch.randn(9, 3, generator=g, dtype=torch.float64)
    S = whitening(random_hessian(7, seed=7)).S
    # vec(L R S) = (S^T kron L) vec(R) with column-major vec.
    vec_R = torch.linalg.lstsq(torch.kron(S.T, L), (W @ S).T.reshape(-1, 1)).solution
    R_weighted = vec_R.reshape(7, 3).T
    assert torch.allclose(solve_normal(L, W).R, R_weighted, atol=1e-10)


def _dead_case():
    g = torch.Generator().manual_seed(8)
    W = torch.randn(14, 10, generator=g, dtype=torch.float64)
    return W, random_hessian(10, seed=9, dead=(2, 7)), [i for i in range(10) if i not in (2, 7)]


def test_dead_inputs_are_regularised_and_cost_at_most_the_shift():
    W, H, live = _dead_case()
    r = 3
    w = whitening(H)
    mean_diag = float(H.diagonal().mean())
    assert 0 < w.shift <= 1e-9 * mean_diag + DEFAULT_EPS * mean_diag  # lambda_min is 0 up to eigvalsh round-off
    L, R = whitened_svd(W, w, r, "exact")
    assert torch.isfinite(R).all()
    got = weighted_sq(W - L @ R, H)
    # The optimum: dead columns carry no weight, so it is Eckart-Young on the live block ...
    S_live = torch.linalg.cholesky(H[live][:, live])
    opt = _tail(W[:, live], S_live, r)
    assert got >= opt * (1 - 1e-9)
    # ... and the regularised solution costs at most shift * ||D*||^2 more, for any optimal D* (here: the live optimum
    # with its dead columns refit by least squares).
    L_live, _ = whitened_svd(W[:, live], whitening(H[live][:, live]), r, "exact")
    D_star = W - L_live @ solve_normal(L_live, W).R
    assert got <= opt + w.shift * float(D_star.square().sum()) * (1 + 1e-9)


@pytest.mark.parametrize("case", ["rank_deficient", "negative_eigenvalue", "zero"])
def test_singular_and_indefinite_hessians_give_finite_factors(case):
    n = 16
    g = torch.Generator().manual_seed(10)
    W = torch.randn(12, n, generator=g, dtype=torch.float32)
    if case == "rank_deficient":  # fewer calibration samples than inputs
        H = random_hessian(n, seed=11, samples=5)
    elif case == "negative_eigenvalue":  # round-off made one eigenvalue -1e-9
        Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        lam = torch.linspace(1.0, 2.0, n, dtype=torch.float64)
        lam[0] = -1e-9
        H = (Q * lam) @ Q.T
    else:
        H = torch.zeros(n, n, dtype=torch.float64)
    w = whitening(H)
    assert w.shift > 0 and torch.isfinite(w.S).all()
    if case == "negative_eigenvalue":
        assert w.shift >= 1e-9
    L, R = whitened_svd(W, w, 4)
    assert torch.isfinite(L).all() and torch.isfinite(R).all()
    err = weighted_relative_error(W, L @ R, H)
    assert torch.isfinite(err) and float(err) <= 1.0 + 1e-6  # L R is a projection of W: never worse than 0


def test_zero_hessian_falls_back_to_the_plain_svd(decaying):
    w = whitening(torch.zeros(90, 90))
    assert w.shift == 1.0 and torch.equal(w.S, torch.eye(90, dtype=torch.float64))
    L, R = whitened_svd(decaying, w, 5, "exact")
    U, s, Vh = truncated_svd(decaying, 5, "exact")
    assert torch.allclose(L @ R, (U * s) @ Vh, atol=1e-5)  # float32 round-off of two routes to the same product


def test_bad_hessians_are_refused():
    with pytest.raises(ValueError, match="square"):
        whitening(torch.ones(3, 4))
    with pytest.raises(ValueError, match="non-finite"):
        whitening(torch.full((3, 3), float("nan")))
    with pytest.raises(ValueError, match="semi-definite"):
        whitening(-torch.eye(3))


def test_whitened_spectrum_matches_lapack():
    g = torch.Generator().manual_seed(12)
    W = torch.randn(20, 15, generator=g, dtype=torch.float64)
    w = whitening(random_hessian(15, seed=13))
    ref = torch.linalg.svdvals(W @ w.S)
    # Precise float64 Gram: accurate to ~1e-8 sigma_max (svd.singular_values).
    assert torch.allclose(whitened_singular_values(W, w), ref, rtol=0, atol=1e-8 * float(ref[0]))


def test_sketch_basis_is_the_seeded_whitened_sketch():
    g = torch.Generator().manual_seed(14)
    W = torch.randn(25, 18, generator=g, dtype=torch.float64)
    w = whitening(random_hessian(18, seed=15))
    A = W @ w.S
    Y = whitened_sketch_basis(W, w, 6, seed=3)
    assert torch.allclose(Y, A @ sketch_matrix(18, 6, 3, dtype=torch.float64), atol=1e-12)
    assert torch.equal(Y, whitened_sketch_basis(W, w, 6, seed=3))
    Y2 = whitened_sketch_basis(W, w, 6, seed=3, power_iters=2)
    P = Y2 @ Y2.T  # Y2 is orthonormal; it spans (A A^T)^2 Y
    Z, _ = torch.linalg.qr(A @ A.T @ A @ A.T @ Y)
    assert torch.allclose(Y2.T @ Y2, torch.eye(6, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(P, Z @ Z.T, atol=1e-8)  # subspaces equal; cond of the Krylov product limits this to ~1e-10


def test_whitened_basis_reaches_the_weighted_optimum_where_the_plain_one_does_not():
    g = torch.Generator().manual_seed(16)
    n, r = 40, 5
    W = torch.randn(50, n, generator=g, dtype=torch.float64)
    H = random_hessian(n, seed=17)
    w = whitening(H)
    opt = _tail(W, w.S, r)

    def refit_error(Y):
        return weighted_sq(W - Y @ solve_normal(Y, W).R, H)

    whitened = refit_error(whitened_sketch_basis(W, w, r, seed=0, power_iters=4))
    Q, _ = torch.linalg.qr(W @ sketch_matrix(n, r, 0, dtype=torch.float64))
    for _ in range(4):  # the unwhitened LPLR basis with the same iterations
        Q, _ = torch.linalg.qr(W @ (W.T @ Q))
    assert opt <= whitened <= 1.05 * opt  # measured 1.012 (4.4 for the plain basis): convergence, not round-off
    assert refit_error(Q) > 1.2 * opt
