"""Truncated SVD: exact, Gram and randomized routes agree on a decaying spectrum, with canonical signs."""

from __future__ import annotations

import math

import pytest
import torch

from lplr_convert.math.svd import choose_svd_method, singular_values, truncated_svd

ROUTES = ["exact", "gram", "randomized", "auto"]


@pytest.mark.parametrize("transpose", [False, True], ids=["tall", "wide"])
def test_routes_agree_on_a_decaying_spectrum(decaying, transpose):
    W = decaying.T.contiguous() if transpose else decaying
    k = 12
    ref_s = torch.linalg.svdvals(W.double())
    sigma = 0.85 ** torch.arange(90, dtype=torch.float64)
    assert torch.allclose(ref_s, sigma, rtol=1e-5)
    eckart_young = math.sqrt(float(sigma[k:].square().sum() / sigma.square().sum()))
    results = {route: truncated_svd(W, k, route, seed=5) for route in ROUTES}
    for route, (U, s, Vh) in results.items():
        assert U.shape == (W.shape[0], k) and s.shape == (k,) and Vh.shape == (k, W.shape[1]), route
        assert torch.allclose(s.double(), ref_s[:k], rtol=1e-4), route
        err = float(((U * s) @ Vh - W).double().norm() / W.double().norm())
        assert err == pytest.approx(eckart_young, rel=1e-4), route
        # Canonical signs make the vectors themselves agree across routes.
        assert torch.allclose(U, results["exact"][0], atol=1e-3), route
        assert torch.allclose(Vh, results["exact"][2], atol=1e-3), route
        assert torch.allclose(U.T @ U, torch.eye(k), atol=1e-4), route


def test_sign_convention(decaying):
    U, _, _ = truncated_svd(decaying, 10, "exact")
    top = U.gather(0, U.abs().argmax(dim=0, keepdim=True))
    assert (top > 0).all()


def test_randomized_route_is_seeded(decaying):
    a = truncated_svd(decaying, 5, "randomized", seed=1)
    b = truncated_svd(decaying, 5, "randomized", seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_auto_choice():
    assert choose_svd_method(384, 1536, 300) == "gram"
    assert choose_svd_method(384, 384, 3) == "gram"  # small matrices: exact-quality Gram route
    assert choose_svd_method(8192, 8192, 64) == "randomized"
    assert choose_svd_method(8192, 8192, 4000) == "gram"


def test_singular_values_match_lapack(decaying, gen):
    for W in (decaying, decaying.T, torch.randn(40, 70, generator=gen)):
        ref = torch.linalg.svdvals(W.double())
        assert torch.allclose(singular_values(W), ref, rtol=1e-3, atol=1e-6 * float(ref[0]))


def test_bad_rank_and_method_are_refused(decaying):
    with pytest.raises(ValueError, match=r"outside 1\.\.90"):
        truncated_svd(decaying, 91)
    with pytest.raises(ValueError, match=r"outside 1\.\.90"):
        truncated_svd(decaying, 0)
    with pytest.raises(ValueError, match="exact, gram, randomized"):
        truncated_svd(decaying, 3, "lanczos")


def test_fast_singular_values_give_the_same_energy_curve(decaying, gen):
    """The working-precision route (used for the report's plots) agrees with float64 on every cumulative energy."""
    from lplr_convert.report.spectra import energy_curve

    for W in (decaying, decaying.T, torch.randn(300, 120, generator=gen) * torch.logspace(0, -3, 120)):
        fast, ref = singular_values(W, precise=False), singular_values(W)
        assert fast.dtype == torch.float64 and fast.shape == ref.shape
        assert max(abs(a - b) for a, b in zip(energy_curve(fast), energy_curve(ref), strict=True)) < 1e-4
        assert torch.allclose(fast[:5], ref[:5], rtol=1e-5)
