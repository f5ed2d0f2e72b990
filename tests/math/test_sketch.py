"""Sketches: reproducible from a seed, distinct per tensor name, and isotropic (E[S S^T] = I)."""

from __future__ import annotations

import math

import pytest
import torch

from lplr_convert.math.sketch import derive_seed, sketch_matrix


def test_derive_seed_is_stable_and_name_dependent():
    a = derive_seed(0, "encoder.layer.0.attention.self.query.weight")
    assert a == derive_seed(0, "encoder.layer.0.attention.self.query.weight")
    assert a != derive_seed(0, "encoder.layer.0.attention.self.key.weight")
    assert a != derive_seed(1, "encoder.layer.0.attention.self.query.weight")
    assert 0 <= a < 2**63
    # Pinned: manifests store the global seed only, so this value must never change between releases.
    assert derive_seed(0, "w") == 5059071460808188574


@pytest.mark.parametrize("kind", ["gaussian", "sparse"])
def test_same_seed_same_sketch_and_different_name_different_sketch(kind):
    s1 = sketch_matrix(300, 40, derive_seed(7, "a.weight"), kind)
    s2 = sketch_matrix(300, 40, derive_seed(7, "a.weight"), kind)
    s3 = sketch_matrix(300, 40, derive_seed(7, "b.weight"), kind)
    assert torch.equal(s1, s2)
    assert not torch.equal(s1, s3)
    assert s1.shape == (300, 40) and s1.dtype == torch.float32


def test_independent_of_global_rng_and_dtype():
    torch.manual_seed(0)
    a = sketch_matrix(50, 10, 99)
    torch.manual_seed(1)
    b = sketch_matrix(50, 10, 99, dtype=torch.float64)
    assert torch.equal(a.double(), b)


@pytest.mark.parametrize("kind", ["gaussian", "sparse"])
def test_expected_outer_product_is_identity(kind):
    """Averaged over seeds, S S^T is the identity (the N(0, 1/r) scale; +-1/sqrt(s) for the sparse sketch)."""
    n, r, draws = 12, 16, 400
    acc = torch.zeros(n, n, dtype=torch.float64)
    for seed in range(draws):
        s = sketch_matrix(n, r, seed, kind).double()
        acc += s @ s.T
    mean = acc / draws
    # Each entry of a single S S^T has standard deviation about sqrt(1/r) (off-diagonal) or sqrt(2/r) (diagonal).
    tol = 5 * math.sqrt(2 / r) / math.sqrt(draws)
    assert (mean - torch.eye(n, dtype=torch.float64)).abs().max() < tol


def test_gaussian_entries_have_variance_one_over_r():
    s = sketch_matrix(2000, 50, 3).double()
    assert abs(float(s.mean())) < 5 * math.sqrt(1 / 50 / s.numel())
    assert float(s.var()) == pytest.approx(1 / 50, rel=0.03)


@pytest.mark.parametrize("r", [3, 8, 40])
def test_sparse_sketch_rows(r):
    s = sketch_matrix(500, r, 11, "sparse")
    nnz = min(8, r)
    assert torch.equal((s != 0).sum(dim=1), torch.full((500,), nnz))
    assert torch.allclose(s[s != 0].abs(), torch.full((500 * nnz,), 1 / math.sqrt(nnz)))
    signs = torch.sign(s[s != 0])
    assert 0.4 < float((signs > 0).float().mean()) < 0.6
    assert torch.allclose((s * s).sum(dim=1), torch.ones(500))


def test_unknown_sketch_is_refused():
    with pytest.raises(ValueError, match="gaussian, sparse"):
        sketch_matrix(4, 2, 0, "hadamard")


def test_sketch_product_in_float32_is_the_plain_product():
    from lplr_convert.math.sketch import sketch_product

    g = torch.Generator().manual_seed(3)
    W, S = torch.randn(50, 120, generator=g), sketch_matrix(120, 30, 9)
    Y, used = sketch_product(W, S, "float32")
    assert used == "float32" and torch.equal(Y, W @ S)
    Y64, used = sketch_product(W.double(), S, "auto")  # auto never lowers a float64 matrix
    assert used == "float64" and torch.equal(Y64, W.double() @ S.double())


def test_sketch_product_in_bfloat16_is_within_its_rounding_bound():
    """W, S and the product each rounded to bfloat16 (unit round-off u = 2**-8), sums in float32 inside the GEMM:
    |Y - W S| <= (3u + u**2 + n 2**-23) |W| |S| entry by entry."""
    from lplr_convert.math.sketch import sketch_product

    g = torch.Generator().manual_seed(4)
    n = 120
    W = torch.randn(50, n, generator=g) * torch.logspace(-2, 2, n)
    S = sketch_matrix(n, 30, 11)
    Y, used = sketch_product(W, S, "bfloat16")
    assert used == "bfloat16" and Y.dtype == torch.float32
    u = 2.0**-8
    scale = W.double().abs() @ S.double().abs()
    err = (Y.double() - W.double() @ S.double()).abs()
    assert bool((err <= (3 * u + u * u + n * 2.0**-23) * scale).all())
    assert float(err.max()) > 0  # it is a different product: the bound is what holds, not equality


def test_sketch_product_auto_follows_the_device_and_rejects_unknown_precisions():
    from lplr_convert.math.sketch import native_bfloat16, sketch_product

    W, S = torch.randn(20, 16), sketch_matrix(16, 8, 1)
    assert sketch_product(W, S, "auto")[1] == ("bfloat16" if native_bfloat16("cpu") else "float32")
    with pytest.raises(ValueError, match="sketch precision 'half' is unknown"):
        sketch_product(W, S, "half")


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_lplr_quantizes_the_sketch_product_it_records(precision):
    """L's codes are those of quantizing `sketch_product` in the chosen precision, and the record says which."""
    from lplr_convert.math import quantize as qz
    from lplr_convert.math.sketch import sketch_product
    from lplr_convert.methods import RankPolicy, get_method, make_settings
    from lplr_convert.methods._common import factor_specs

    W = torch.randn(90, 70, generator=torch.Generator().manual_seed(6))
    s = make_settings(method="lplr", b1=8, b2=8, rank=RankPolicy("rank", 20), sketch_precision=precision)
    res = get_method("lplr").compress(W, s, 13)
    assert res.extra["sketch_precision"] == precision
    Y, _ = sketch_product(W, sketch_matrix(70, 20, 13), precision)
    left, _ = factor_specs(90, 70, 20, s)
    stored = qz.from_fields({k.split(".", 1)[1]: v for k, v in res.parts.items() if k.startswith("lplr_left.")}, left)
    assert torch.equal(stored.codes, qz.quantize_spec(Y, left).codes)


def test_lplr_auto_keeps_float32_for_float_factors():
    from lplr_convert.methods import RankPolicy, get_method, make_settings

    W = torch.randn(40, 30, generator=torch.Generator().manual_seed(8))
    s = make_settings(method="lplr", b1=16, b2=16, rank=RankPolicy("rank", 10))
    assert get_method("lplr").compress(W, s, 1).extra["sketch_precision"] == "float32"
