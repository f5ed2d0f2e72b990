"""Quantizers: granularities, code range, error bound, float casts, refused widths, storage size and round trips."""

from __future__ import annotations

import math

import pytest
import torch

from lplr_convert.errors import LplrError
from lplr_convert.math import quantize as qz
from lplr_convert.methods import MethodSettings

GRANULARITIES = [("tensor", 0, None), ("channel", 0, None), ("channel", 1, None), ("group", 0, 64),
                 ("group", 0, 7)]


def _matrix(gen, m=83, n=145):
    """Rows and columns on very different scales, plus one constant row (zero range)."""
    x = torch.randn(m, n, generator=gen) * torch.logspace(-2, 1, m).unsqueeze(1) * torch.logspace(0, 1, n)
    x[5] = 0.25
    return x


def _groups(x: torch.Tensor, spec: qz.QuantSpec) -> torch.Tensor:
    """Index of the scale group of every entry (same shape as x)."""
    m, n = x.shape
    rows = torch.arange(m).unsqueeze(1).expand(m, n)
    cols = torch.arange(n).unsqueeze(0).expand(m, n)
    if spec.granularity == "tensor":
        return torch.zeros(m, n, dtype=torch.long)
    if spec.granularity == "channel":
        return rows if spec.channel_dim == 0 else cols
    return rows * math.ceil(n / spec.group_size) + cols // spec.group_size


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("gran,dim,gs", GRANULARITIES)
def test_codes_in_range_and_error_within_half_a_step(bits, gran, dim, gs, gen):
    x = _matrix(gen)
    q = qz.quantize(x, bits, gran, dim, gs)
    assert q.codes.dtype == torch.uint8 and q.codes.shape == x.shape
    assert int(q.codes.max()) <= (1 << bits) - 1
    assert tuple(q.scale.shape) == tuple(q.zero.shape) == q.spec.scale_shape
    x_hat = qz.dequantize(q)
    # Every entry is within half a step of its group's scale (plus float32 round-off).
    group = _groups(x, q.spec)
    step = q.scale.reshape(-1)[group]
    err = (x_hat - x).abs()
    assert bool((err <= step / 2 * (1 + 1e-5) + 1e-6 * x.abs()).all())
    # The group minimum is reproduced exactly (code 0 = zero point), the maximum up to round-off.
    for g in torch.unique(group)[:50]:
        sel = group == g
        assert x_hat[sel].min() == x[sel].min()
        assert torch.isclose(x_hat[sel].max(), x[sel].max(), rtol=1e-5, atol=1e-6)


def test_scale_shapes():
    assert qz.QuantSpec((6, 10), 4, "tensor").scale_shape == (1, 1)
    assert qz.QuantSpec((6, 10), 4, "channel", 0).scale_shape == (6, 1)
    assert qz.QuantSpec((6, 10), 4, "channel", 1).scale_shape == (1, 10)
    assert qz.QuantSpec((6, 10), 4, "group", group_size=4).scale_shape == (6, 3)


def test_finer_granularity_is_more_accurate(gen):
    """With rows on different scales, per-row scales beat one scale for the tensor, and small groups beat rows."""
    x = _matrix(gen)
    err = {}
    for name, (gran, dim, gs) in {"tensor": ("tensor", 0, None), "channel": ("channel", 0, None),
                                  "group": ("group", 0, 16)}.items():
        err[name] = float((qz.dequantize(qz.quantize(x, 4, gran, dim, gs)) - x).norm() / x.norm())
    assert err["channel"] < 0.5 * err["tensor"]
    assert err["group"] < err["channel"]


def test_constant_matrix_is_exact():
    x = torch.full((4, 9), -1.5)
    for gran, dim, gs in GRANULARITIES:
        q = qz.quantize(x, 3, gran, dim, gs)
        assert torch.equal(qz.dequantize(q), x)


def test_float16_cast_when_it_fits(gen):
    x = torch.randn(30, 20, generator=gen) * 100
    q = qz.quantize(x, 16)
    assert q.codes.dtype == torch.float16 and q.spec.float_dtype == "float16"
    assert torch.equal(qz.dequantize(q), x.half().float())


def test_bfloat16_where_float16_would_overflow(gen):
    x = torch.randn(30, 20, generator=gen)
    x[3, 4] = 1.0e5  # beyond float16's 65504
    assert torch.isinf(x.half()).any()
    q = qz.quantize(x, 16)
    assert q.codes.dtype == torch.bfloat16 and q.spec.float_dtype == "bfloat16"
    x_hat = qz.dequantize(q)
    assert torch.isfinite(x_hat).all()
    assert torch.allclose(x_hat, x, rtol=2**-8, atol=0)


def test_float32_is_exact(gen):
    x = torch.randn(17, 33, generator=gen)
    q = qz.quantize(x, 32)
    assert q.spec.float_dtype == "float32"
    assert torch.equal(qz.dequantize(q), x)


@pytest.mark.parametrize("bits", [0, 9, 12, 64, -1, 8.0, True, "8"])
def test_disallowed_bits_are_refused_with_the_allowed_list(bits, gen):
    with pytest.raises(ValueError) as info:
        qz.quantize(torch.randn(3, 3, generator=gen), bits)
    assert "1-8" in str(info.value) and "16" in str(info.value) and "32" in str(info.value)
    with pytest.raises(LplrError, match=r"1-8 .*16.*32"):
        MethodSettings(b1=bits)


def test_bad_granularity_and_group_size_are_refused():
    with pytest.raises(ValueError, match="tensor, channel, group"):
        qz.quantize(torch.zeros(2, 2), 4, "row")
    with pytest.raises(ValueError, match="group size"):
        qz.quantize(torch.zeros(2, 2), 4, "group")
    with pytest.raises(ValueError, match="2-D"):
        qz.quantize(torch.zeros(8), 4)


ALL_BITS = [1, 2, 3, 5, 7, 8, 16, 32]


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("gran,dim,gs", GRANULARITIES)
def test_stored_bits_is_the_real_byte_count(bits, gran, dim, gs, gen):
    x = _matrix(gen, 37, 51)
    q = qz.quantize(x, bits, gran, dim, gs)
    fields = qz.to_fields(q)
    assert qz.stored_bits(q.spec) == 8 * sum(t.numel() * t.element_size() for t in fields.values())
    predicted = qz.field_specs(q.spec)
    assert set(predicted) == set(fields)
    for name, t in fields.items():
        assert predicted[name] == (str(t.dtype).removeprefix("torch."), tuple(t.shape))


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("gran,dim,gs", GRANULARITIES)
def test_from_fields_inverts_to_fields(bits, gran, dim, gs, gen):
    x = _matrix(gen, 37, 51)
    q = qz.quantize(x, bits, gran, dim, gs)
    spec = qz.QuantSpec.from_json(q.spec.to_json())
    assert spec == q.spec
    back = qz.from_fields(qz.to_fields(q), spec)
    assert torch.equal(back.codes, q.codes)
    assert torch.equal(qz.dequantize(back), qz.dequantize(q))


def test_from_fields_rejects_damaged_input(gen):
    q = qz.quantize(torch.randn(6, 10, generator=gen), 4, "channel", 0)
    fields = qz.to_fields(q)
    with pytest.raises(ValueError, match="'zero'"):
        qz.from_fields({k: v for k, v in fields.items() if k != "zero"}, q.spec)
    with pytest.raises(ValueError, match="scales have shape"):
        qz.from_fields({**fields, "scale": fields["scale"][:3]}, q.spec)
    with pytest.raises(ValueError, match="bytes"):
        qz.from_fields({**fields, "packed": fields["packed"][:-1]}, q.spec)
    with pytest.raises(ValueError, match="shape"):
        qz.from_fields({"": torch.zeros(6, 9)}, qz.quantize(torch.zeros(6, 10), 16).spec)


def test_channel_dim_selects_rows_or_columns(gen):
    """channel_dim=0: one scale per row (right factor, RTN); channel_dim=1: one per column (left factor)."""
    x = torch.randn(5, 8, generator=gen) * torch.arange(1, 9)  # column scales differ
    rows = qz.quantize(x, 8, "channel", 0)
    cols = qz.quantize(x, 8, "channel", 1)
    assert torch.allclose(cols.zero.reshape(-1), x.amin(dim=0))
    assert torch.allclose(rows.zero.reshape(-1), x.amin(dim=1))


@pytest.mark.parametrize("bits", [1, 4, 8, 16, 32])
@pytest.mark.parametrize("gran,dim,gs", GRANULARITIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_quantize_dequantize_equals_the_two_steps_bit_for_bit(bits, gran, dim, gs, dtype, gen):
    """The fused form must give exactly what a loader reconstructs from the stored fields."""
    x = _matrix(gen).to(dtype)
    q, x_hat = qz.quantize_dequantize(x, bits, gran, dim, gs, dtype=dtype)
    q2 = qz.quantize(x, bits, gran, dim, gs)
    assert q.spec == q2.spec and torch.equal(q.codes, q2.codes)
    fields = qz.to_fields(q)
    assert all(torch.equal(a, b) for a, b in zip(fields.values(), qz.to_fields(q2).values(), strict=True))
    assert x_hat.dtype == dtype
    assert torch.equal(x_hat, qz.dequantize(qz.from_fields(fields, q.spec), dtype))
