"""The least-squares products from integer codes (`code_gram`, `code_cross`) against float64 products of the decoded
factor, with error bounds from the construction; where they apply and where they must step aside.

The integer path is forced on (`integer_matmul` -> True): torch._int_mm is exact on every CPU, fast only on some, and
the tests must exercise it whatever machine runs them.
"""

from __future__ import annotations

import pytest
import torch

from lplr_convert.math import lstsq
from lplr_convert.math import quantize as qz
from lplr_convert.math.lstsq import code_cross, code_gram, solve_normal


@pytest.fixture(autouse=True)
def _integer_path(monkeypatch):
    monkeypatch.setattr(lstsq, "integer_matmul", lambda device: True)


def _left(gen, m=300, r=70, bits=8, scheme="asymmetric", granularity="channel", dtype=torch.float32):
    # Columns with different ranges and offsets, as a sketch's columns have.
    Y = torch.randn(m, r, generator=gen) * torch.rand(r, generator=gen) + 0.3 * torch.rand(r, generator=gen)
    spec = qz.QuantSpec((m, r), bits, granularity, 1, scheme=scheme,
                        scale_dtype="float32" if scheme == "minmax" else "float16")
    return qz.quantize_dequantize_spec(Y.to(dtype), spec, dtype)


@pytest.mark.parametrize("scheme", ["minmax", "symmetric", "asymmetric"])
@pytest.mark.parametrize("granularity", ["channel", "tensor"])
@pytest.mark.parametrize("bits", [8, 4, 1])
def test_code_gram_is_the_gram_of_the_decoded_factor(gen, scheme, granularity, bits):
    q, L = _left(gen, bits=bits, scheme=scheme, granularity=granularity)
    G = code_gram(q)
    assert G.dtype == torch.float64 and torch.equal(G, G.T)
    exact = L.double().T @ L.double()
    # Symmetric and asymmetric codes decode exactly in float32 ((c - zp) * s: an integer of <= 9 bits times a float16
    # scale), so G is that Gram up to float64 rounding. minmax decodes c * s + lo with one float32 rounding per entry
    # (relative 2**-24), which the Gram of the exact affine values does not carry.
    tol = 1e-12 if scheme != "minmax" else 2.0**-23
    assert float((G - exact).abs().max()) <= tol * float(exact.abs().max())


def test_code_gram_sums_row_blocks_exactly(gen, monkeypatch):
    q, L = _left(gen, m=300)
    whole = code_gram(q)
    monkeypatch.setattr(lstsq, "_INT_ROWS", 64)  # 5 blocks, the last one short
    assert torch.equal(code_gram(q), whole)


@pytest.mark.parametrize("scheme", ["minmax", "asymmetric"])
def test_code_cross_is_within_the_limb_bound(gen, scheme):
    q, L = _left(gen, scheme=scheme)
    # Columns of very different scales, and entries far below their column's largest (the limbs' weak spot).
    W = torch.randn(300, 50, generator=gen) ** 3 * torch.logspace(-3, 2, 50)
    X = code_cross(q, W)
    exact = L.double().T @ W.double()
    # W~ = W - E with |E_ij| < a_j / 128**2 and a_j <= 2 max_i |W_ij| / 127; minmax adds L's float32 rounding.
    a = 2 * W.abs().amax(dim=0).double() / 127
    bound = L.double().abs().T @ torch.ones(300, 50, dtype=torch.float64) * (a / 128**2)
    if scheme == "minmax":
        bound += 2.0**-24 * (L.double().abs().T @ W.double().abs())
    assert bool(((X - exact).abs() <= bound * (1 + 1e-9) + 1e-300).all())
    # ... and the bound is not vacuous: far below the scale of each sum (|L|^T |W|), heavy-tailed columns included.
    assert bool((bound <= 1e-3 * (L.double().abs().T @ W.double().abs())).all())


def test_code_cross_is_exact_for_float16_columns_of_moderate_range(gen):
    q, L = _left(gen, scheme="symmetric")
    W = (torch.rand(300, 40, generator=gen) * 2 - 1).clamp(min=-1, max=1)
    W = torch.where(W.abs() < 2**-9, torch.full_like(W, 2**-9), W).half().float()  # range < 2**10 per column
    assert torch.equal(code_cross(q, W), L.double().T @ W.double())


def test_code_cross_column_blocks_give_the_same_bits_and_row_blocks_stay_within_the_bound(gen, monkeypatch):
    q, L = _left(gen)
    W = torch.randn(300, 90, generator=gen)
    whole = code_cross(q, W)
    monkeypatch.setattr(lstsq, "_CROSS_BLOCK_ELEMENTS", 300 * 17)  # 17-column blocks, a short last one
    assert torch.equal(code_cross(q, W), whole)  # each column's limbs do not depend on its neighbours
    monkeypatch.setattr(lstsq, "_INT_ROWS", 128)  # 3 row blocks with their own scales (no larger than the column's)
    X = code_cross(q, W)
    exact = L.double().T @ W.double()
    a = 2 * W.abs().amax(dim=0).double() / 127
    bound = L.double().abs().T @ torch.ones(300, 90, dtype=torch.float64) * (a / 128**2)
    assert bool(((X - exact).abs() <= bound).all())


@pytest.mark.parametrize("spec", [qz.QuantSpec((64, 24), 16, float_dtype="float16"),
                                  qz.QuantSpec((64, 24), 8, "channel", 0),
                                  qz.QuantSpec((64, 24), 8, "group", group_size=8)], ids=["float", "rows", "group"])
def test_integer_products_step_aside_where_codes_are_not_per_column(gen, spec):
    q = qz.quantize_spec(torch.randn(64, 24, generator=gen), spec)
    assert code_gram(q) is None and code_cross(q, torch.randn(64, 5, generator=gen)) is None


def test_integer_cross_steps_aside_for_a_half_precision_right_hand_side(gen):
    q = qz.quantize_spec(torch.randn(64, 24, generator=gen), qz.QuantSpec((64, 24), 8, "channel", 1))
    assert code_cross(q, torch.randn(64, 5, generator=gen).half()) is None


def test_solve_normal_with_codes_reaches_the_least_squares_optimum(gen):
    q, L = _left(gen, m=400, r=60)
    W = torch.randn(400, 90, generator=gen)
    R = solve_normal(L, W, q).R
    best = torch.linalg.lstsq(L.double(), W.double()).solution
    res = float((W.double() - L.double() @ R.double()).norm())
    opt = float((W.double() - L.double() @ best).norm())
    assert res <= opt * (1 + 1e-6)
    # The same solve without the codes (float32 products) reaches the same optimum.
    R32 = solve_normal(L, W).R
    assert float((W.double() - L.double() @ R32.double()).norm()) <= opt * (1 + 1e-6)


@pytest.mark.parametrize("m,r,n", [(3, 1, 1), (1, 1, 1), (1, 5, 2), (17, 3, 9), (40, 1200, 7)])
def test_integer_products_of_small_and_degenerate_shapes(gen, m, r, n):
    """One column (a 1 x m transpose whose strides torch._int_mm misread), one row, and the blocked Gram (r >= 1024)."""
    q, L = _left(gen, m=m, r=r)
    W = torch.randn(m, n, generator=gen)
    G, X = code_gram(q), code_cross(q, W)
    exact = L.double().T @ L.double()
    assert float((G - exact).abs().max()) <= 1e-12 * max(float(exact.abs().max()), 1e-300)
    assert float((X - L.double().T @ W.double()).abs().max()) <= 1e-5 * max(float((L.abs().T @ W.abs()).max()), 1e-30)


def test_integer_products_step_aside_for_an_empty_factor():
    q = qz.Quantized(qz.QuantSpec((0, 4), 8, "channel", 1), torch.zeros(0, 4, dtype=torch.uint8),
                     torch.ones(1, 4), torch.zeros(1, 4))
    assert code_gram(q) is None and code_cross(q, torch.zeros(0, 3)) is None
