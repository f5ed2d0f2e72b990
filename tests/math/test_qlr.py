"""Q + L R against H: rank 0 is the backbone, the kept iterate is the best candidate, exact cases match whitened_svd."""

from __future__ import annotations

import pytest
import torch
from calib_testing import random_hessian

from lplr_convert.math import qlr as qlr_module
from lplr_convert.math.qlr import factored_weighted_error, qlr
from lplr_convert.math.weighted import weighted_error, weighted_relative_error
from lplr_convert.math.whiten import whitened_singular_values, whitened_svd, whitening


def rtn(bits: int):
    """Symmetric per-row absmax round-to-nearest with 2^(bits-1) - 1 positive levels (zero representable)."""
    levels = 2 ** (bits - 1) - 1 if bits > 1 else 1

    def quantize(M, H):
        scale = M.abs().amax(dim=1, keepdim=True).clamp_min(1e-30) / levels
        codes = (M / scale).round().clamp(-levels, levels)
        return (codes.to(torch.int8), scale), codes * scale

    return quantize


def identity(M, H):
    return M, M


def fp16(M, H):
    half = M.half()
    return half, half.to(M.dtype)


@pytest.fixture
def problem():
    g = torch.Generator().manual_seed(21)
    W = torch.randn(24, 16, generator=g, dtype=torch.float64)
    return W, random_hessian(16, seed=22)


def test_rank_zero_is_exactly_the_backbone(problem):
    W, H = problem
    res = qlr(W, H, 0, rtn(2), rtn(4), rtn(4))
    stored, Q = rtn(2)(W, H)
    assert torch.equal(res.Q, Q) and all(torch.equal(a, b) for a, b in zip(res.q_stored, stored))
    assert res.L.shape == (24, 0) and res.R.shape == (0, 16) and res.l_stored is None and res.r_stored is None
    assert res.history == [res.error] and res.best == 0
    assert res.error == pytest.approx(float(weighted_relative_error(W, Q, H)), rel=1e-12)


@pytest.mark.parametrize("rank,factor_bits", [(1, 4), (4, 3), (8, 1)])
def test_kept_iterate_is_the_best_candidate_and_never_worse_than_the_backbone(problem, rank, factor_bits):
    W, H = problem
    res = qlr(W, H, rank, rtn(2), rtn(factor_bits), rtn(factor_bits), iters=3)
    assert len(res.history) == 1 + 2 * 3
    assert res.error == min(res.history) == res.history[res.best]
    assert res.error <= res.history[0]
    # The reported error is that of the returned matrices (a mismatched Q and L R would show here).
    W_hat = res.Q + res.L @ res.R
    assert res.error == pytest.approx(float(weighted_relative_error(W, W_hat, H)), rel=1e-9)


def test_harmful_factors_are_not_kept(problem):
    """The guarantee is by construction: a factor "quantizer" that overshoots by 2.5x turns the optimal correction P E
    into 2.5 P E, whose error ||E||^2 + 1.25 ||P E||^2 (whitened) exceeds the backbone's, so only rank 0 may be kept.
    (Real 1-bit factors did not hurt here: the least-squares refit rescales them.)"""
    W, H = problem
    res = qlr(W, H, 8, rtn(2), identity, lambda M, H: (M, 2.5 * M), iters=2)
    assert min(res.history[1:]) > res.history[0]
    assert res.best == 0 and res.error == res.history[0] and res.L.shape == (24, 0)


def test_unquantized_factors_are_the_optimal_correction_of_the_backbone_residual(problem):
    W, H = problem
    rank = 5
    _, Q0 = rtn(2)(W, H)
    w = whitening(H)
    tail = float(whitened_singular_values(W - Q0, w)[rank:].square().sum())
    den = float(weighted_error(W, torch.zeros_like(W), H))
    L_opt, R_opt = whitened_svd(W - Q0, w, rank)
    for refits in (1, 3):  # refits from the optimum cannot improve on it
        res = qlr(W, H, rank, rtn(2), identity, identity, iters=1, refits=refits)
        # float64, cond(S) ~ 1e2: the two computations agree to ~1e-12; the precise Gram spectrum to ~1e-8 sigma_max.
        assert res.history[1] ** 2 * den == pytest.approx(tail, rel=1e-6)
        assert torch.allclose(res.L @ res.R, L_opt @ R_opt, atol=1e-9)
        assert res.error <= res.history[1]


def test_factors_see_their_own_input_statistics(problem):
    W, H = problem
    seen_l, seen_r = [], []

    def record_l(M, H_L):
        seen_l.append(H_L)
        return rtn(3)(M, H_L)

    def record_r(M, H_R):
        seen_r.append(H_R)
        return rtn(3)(M, H_R)

    res = qlr(W, H, 4, rtn(2), record_l, record_r, iters=1, refits=2)
    assert all(h is H for h in seen_r)
    # Round 1 quantizes L = U Sigma, whose R is V^T S^-1: R H R^T = I. Round 2 uses the quantized R of round 1.
    assert torch.allclose(seen_l[0], torch.eye(4, dtype=torch.float64), atol=1e-10)
    assert len(seen_l) == 2 and seen_l[1].shape == (4, 4)
    assert torch.isfinite(torch.tensor(res.history)).all()


def test_half_precision_factors_work(problem):
    W, H = problem
    exact = qlr(W, H, 6, rtn(2), identity, identity, iters=2)
    half = qlr(W, H, 6, rtn(2), fp16, fp16, iters=2)
    assert half.L.dtype == torch.float64 and half.l_stored.dtype == torch.float16
    assert half.error <= half.history[0]
    # fp16 rounds each factor by 2^-11 relative: L R S moves by about 2^-10 ||L R S|| <= 2^-10 ||W S|| (the correction
    # is smaller than W here), so the relative error moves by less than 1e-3 (measured 7e-7).
    assert half.error == pytest.approx(exact.error, abs=1e-3)


def test_low_rank_correction_helps_and_is_seeded(problem):
    W, H = problem
    runs = []
    for global_seed in (0, 1):  # the global generator must not matter
        torch.manual_seed(global_seed)
        runs.append(qlr(W.float(), H, 6, rtn(2), rtn(4), rtn(4), iters=2, seed=5, svd_method="randomized"))
    a, b = runs
    assert a.history == b.history and torch.equal(a.Q, b.Q) and torch.equal(a.L, b.L) and torch.equal(a.R, b.R)
    assert a.L.dtype == torch.float32
    assert a.error < 0.8 * a.history[0]  # measured 0.13: rank 6 of 16, 4-bit factors


@pytest.mark.parametrize("H_kind", ["identity", "dead_inputs", "zero"])
def test_special_hessians(problem, H_kind):
    W, _ = problem
    H = {"identity": torch.eye(16, dtype=torch.float64), "dead_inputs": random_hessian(16, seed=23, dead=(0, 9)),
         "zero": torch.zeros(16, 16, dtype=torch.float64)}[H_kind]
    res = qlr(W, H, 4, rtn(2), rtn(4), rtn(4))
    assert all(torch.isfinite(torch.tensor(e)) for e in res.history)
    assert torch.isfinite(res.L).all() and torch.isfinite(res.R).all()
    assert res.error <= res.history[0]


def test_factored_error_matches_the_dense_one(monkeypatch):
    monkeypatch.setattr(qlr_module, "_BLOCK_ELEMENTS", 50)  # several row blocks
    g = torch.Generator().manual_seed(24)
    E = torch.randn(13, 9, generator=g)
    L, R = torch.randn(13, 3, generator=g), torch.randn(3, 9, generator=g)
    H = random_hessian(9, seed=25)
    dense = float(weighted_error(E.double(), L.double() @ R.double(), H))
    # Both in float64 from the same float32 inputs: equal to round-off (~1e-15 relative).
    assert float(factored_weighted_error(E, L, R, H)) == pytest.approx(dense, rel=1e-12)
    assert float(factored_weighted_error(E, None, None, H)) == pytest.approx(
        float(weighted_error(E, torch.zeros_like(E), H)), rel=1e-12)


def test_bad_arguments_are_refused(problem):
    W, H = problem
    with pytest.raises(ValueError, match="rank"):
        qlr(W, H, 17, rtn(2), rtn(4), rtn(4))
    with pytest.raises(ValueError, match="H must be"):
        qlr(W, H[:5, :5], 2, rtn(2), rtn(4), rtn(4))
    with pytest.raises(ValueError, match="iters"):
        qlr(W, H, 2, rtn(2), rtn(4), rtn(4), iters=0)


def test_lossless_backbone_leaves_nothing_to_fit(problem):
    W, H = problem
    res = qlr(W, H, 4, identity, rtn(4), rtn(4))
    assert res.history == [0.0] * 5 and res.best == 0 and torch.equal(res.Q, W)
