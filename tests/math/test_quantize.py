"""Quantizers: granularities, code range, error bound, float casts, refused widths, storage size and round trips."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math

import pytest
import torch

from lplr_convert import constants as C
from lplr_convert.errors import LplrError
from lplr_convert.math import quantize as qz
from lplr_convert.methods import make_settings

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
        make_settings(b1=bits)


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


# ---- Schemes: the published min-max one unchanged; symmetric and asymmetric (integer zero point) as compressed-tensors
# ---- defines them; float16 scales; clip="mse".

# sha256 (first 16 hex digits) of every stored field of `quantize` and `quantize_dequantize` and of both dequantized
# matrices, bits 1-8, float32 and float64 inputs (see `_minmax_digest`), recorded with the quantizer of 410d79b, before
# schemes existed: the min-max quantizer must stay bit for bit what the published outputs were written with.
MINMAX_SHA256 = {("tensor", 0, None): "c70d79ad2019bf07", ("channel", 0, None): "8107f17b0be8c6e4",
                 ("channel", 1, None): "8f6db8874d2ac4cc", ("group", 0, 64): "8107f17b0be8c6e4",
                 ("group", 0, 7): "3007a4fc6286b607", ("group", 0, 16): "3d15221d5d79b269"}
SCHEME_DTYPES = [("minmax", "float32"), ("symmetric", "float32"), ("symmetric", "float16"),
                 ("asymmetric", "float32"), ("asymmetric", "float16")]
AWKWARD = [("tensor", 0, None), ("channel", 0, None), ("channel", 1, None), ("group", 0, 16), ("group", 0, 64)]


def _minmax_digest(gran, dim, gs) -> str:
    h = hashlib.sha256()
    for bits in range(1, 9):
        for dtype in (torch.float32, torch.float64):
            x = _matrix(torch.Generator().manual_seed(bits), 37, 53).to(dtype)
            q, x_hat = qz.quantize_dequantize(x, bits, gran, dim, gs, dtype=dtype)
            for t in [*qz.to_fields(qz.quantize(x, bits, gran, dim, gs)).values(), *qz.to_fields(q).values(), x_hat,
                      qz.dequantize(q, torch.float32)]:
                h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("gran,dim,gs", list(MINMAX_SHA256))
def test_minmax_is_bit_identical_to_the_published_quantizer(gran, dim, gs):
    assert _minmax_digest(gran, dim, gs) == MINMAX_SHA256[(gran, dim, gs)]


def _spec(x, bits, gran, dim, gs, scheme, scale_dtype="float32", clip=None) -> qz.QuantSpec:
    return qz.QuantSpec(tuple(x.shape), bits, gran, dim, gs, scheme=scheme, scale_dtype=scale_dtype, clip=clip)


def _with_zeros(gen, m=37, n=53):
    """The awkward matrix with scattered exact zeros, an all-zero row and an all-positive row."""
    x = _matrix(gen, m, n)
    x[torch.rand(m, n, generator=gen) < 0.2] = 0
    x[7] = 0
    x[9] = x[9].abs() + 0.1
    return x


def _reference(x: torch.Tensor, spec: qz.QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """compressed-tensors' calculate_qparams + quantize written out one parameter group at a time (float32):
    signed codes q, stored scales, signed zero points. (These formulas were checked against compressed-tensors
    0.20.0 itself on 96 configurations, bits 1-8, when this was written; it is not a test dependency.)"""
    b, storage = spec.bits, getattr(torch, spec.scale_dtype)
    o, levels = 2 ** (b - 1), 2**b - 1
    q, s_out, z_out = torch.empty(x.shape), torch.empty(spec.scale_shape), torch.empty(spec.scale_shape)
    group = _groups(x, spec)
    for k in range(int(group.max()) + 1):
        sel = group == k
        lo, hi = torch.clamp(x[sel].min(), max=0), torch.clamp(x[sel].max(), min=0)
        s = torch.maximum(-lo, hi) / (levels / 2) if spec.scheme == "symmetric" else (hi - lo) / levels
        s_eps = s if s > 0 else torch.tensor(torch.finfo(storage).eps)
        z = torch.zeros(())
        if spec.scheme == "asymmetric" and s > 0:
            z = torch.round(torch.clamp(-o - lo / s_eps, -o, o - 1))
        s_st = s_eps.to(storage).float()
        q[sel] = torch.clamp(torch.round(x[sel] / s_st + z), -o, o - 1)
        s_out.view(-1)[k], z_out.view(-1)[k] = s_st, z
    return q, s_out, z_out


@pytest.mark.parametrize("scheme,scale_dtype", SCHEME_DTYPES[1:])
@pytest.mark.parametrize("gran,dim,gs", AWKWARD)
def test_codes_scales_and_zero_points_follow_compressed_tensors(scheme, scale_dtype, gran, dim, gs, gen):
    """Our code c is compressed-tensors' signed value q + 2**(b-1), our zero point zp its z + 2**(b-1)."""
    x = _with_zeros(gen)
    for bits in range(1, 9):
        q = qz.quantize_spec(x, _spec(x, bits, gran, dim, gs, scheme, scale_dtype))
        ref_q, ref_s, ref_z = _reference(x, q.spec)
        o = 2 ** (bits - 1)
        assert q.spec.scale_dtype == scale_dtype and q.scale.dtype == getattr(torch, scale_dtype)
        assert torch.equal(q.codes.float() - o, ref_q)
        assert torch.equal(q.scale.float(), ref_s)
        if scheme == "asymmetric":
            assert torch.equal(q.zero_point.float() - o, ref_z)
        else:
            assert q.zero_point is None and q.zero is None


@pytest.mark.parametrize("scheme,scale_dtype", SCHEME_DTYPES[1:])
@pytest.mark.parametrize("clip", [None, "mse"])
def test_zero_is_exactly_representable(scheme, scale_dtype, clip, gen):
    x = _with_zeros(gen)
    for bits in range(1, 9) if clip is None else (2, 5):  # (the mse search costs 80 quantizations)
        for gran, dim, gs in AWKWARD:
            x_hat = qz.dequantize(qz.quantize_spec(x, _spec(x, bits, gran, dim, gs, scheme, scale_dtype, clip)))
            assert torch.isfinite(x_hat).all()
            assert bool((x_hat[x == 0] == 0).all())


@pytest.mark.parametrize("scheme,scale_dtype", SCHEME_DTYPES)
@pytest.mark.parametrize("gran,dim,gs", AWKWARD)
def test_every_scheme_round_trips_through_its_stored_fields(scheme, scale_dtype, gran, dim, gs, gen):
    x = _with_zeros(gen)
    for bits in range(1, 9):
        q, x_hat = qz.quantize_dequantize_spec(x, _spec(x, bits, gran, dim, gs, scheme, scale_dtype))
        fields = qz.to_fields(q)
        assert qz.stored_bits(q.spec) == 8 * sum(t.numel() * t.element_size() for t in fields.values())
        predicted = qz.field_specs(q.spec)
        assert {k: (str(t.dtype).removeprefix("torch."), tuple(t.shape)) for k, t in fields.items()} == predicted
        spec = qz.QuantSpec.from_json(json.loads(json.dumps(q.spec.to_json())))
        assert spec == q.spec
        back = qz.from_fields(fields, spec)
        assert torch.equal(back.codes, q.codes) and torch.equal(back.scale, q.scale)
        assert torch.equal(qz.dequantize(back), x_hat)  # what the method measured is what a loader decodes


def test_stored_fields_of_each_scheme():
    x = torch.zeros(6, 10)
    names = {s: set(qz.to_fields(qz.quantize_spec(x, _spec(x, 3, "group", 0, 4, s)))) for s in qz.SCHEMES}
    assert names == {"minmax": {C.FIELD_PACKED, C.FIELD_SCALE, C.FIELD_ZERO},
                     "symmetric": {C.FIELD_PACKED, C.FIELD_SCALE},
                     "asymmetric": {C.FIELD_PACKED, C.FIELD_SCALE, C.FIELD_ZERO_POINT}}
    # 60 codes and 18 zero points at 3 bits, 18 float16 scales.
    assert qz.stored_bits(_spec(x, 3, "group", 0, 4, "asymmetric", "float16")) == 8 * (23 + 7) + 16 * 18


def test_from_fields_rejects_a_scale_dtype_other_than_the_spec(gen):
    x = torch.randn(6, 10, generator=gen)
    q = qz.quantize_spec(x, _spec(x, 4, "channel", 0, None, "asymmetric", "float16"))
    fields = qz.to_fields(q)
    with pytest.raises(ValueError, match="'scale' has dtype"):
        qz.from_fields({**fields, C.FIELD_SCALE: fields[C.FIELD_SCALE].float()}, q.spec)
    with pytest.raises(ValueError, match="'zero_point'"):
        qz.from_fields({k: v for k, v in fields.items() if k != C.FIELD_ZERO_POINT}, q.spec)


@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
def test_tiny_scales_stay_float16_subnormals_within_one_step(scheme, gen):
    """A row of values ~1e-7 gets float16 subnormal scales (floored at 2**-24, never 0): the matrix keeps float16
    scales, decoding the stored fields is exact, and each tiny value is reconstructed to within half its step."""
    x = _with_zeros(gen)
    spec = _spec(x, 4, "group", 0, 16, scheme, "float16")
    x[3] = torch.randn(53, generator=gen) * 1e-7
    q, x_hat = qz.quantize_dequantize_spec(x, spec)
    assert q.spec.scale_dtype == "float16" and (q.scale.float() > 0).all()
    back = qz.from_fields(qz.to_fields(q), qz.QuantSpec.from_json(q.spec.to_json()))
    assert torch.equal(qz.dequantize(back), x_hat)
    step = q.scale[3].float().repeat_interleave(16)[:53]
    assert ((x_hat[3] - x[3]).abs() <= step / 2 + 1e-12).all()  # codes against the stored scale; no clipping


@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
@pytest.mark.parametrize("factor", [1e6])
def test_float16_scales_fall_back_to_float32_for_the_whole_matrix(scheme, factor, gen):
    """A row whose scale is beyond float16's range (1e6) makes the matrix store float32 scales, and says so; the codes
    then match a float32-scale quantization exactly."""
    x = _with_zeros(gen)
    spec = _spec(x, 4, "group", 0, 16, scheme, "float16")
    assert qz.quantize_spec(x, spec).spec.scale_dtype == "float16"  # an all-zero row alone does not fall back
    x[3] = torch.randn(53, generator=gen) * factor
    q, x_hat = qz.quantize_dequantize_spec(x, spec)
    assert q.spec.scale_dtype == "float32" and q.scale.dtype == torch.float32
    ref = qz.quantize_spec(x, dataclasses.replace(spec, scale_dtype="float32"))
    assert torch.equal(q.codes, ref.codes) and torch.equal(q.scale, ref.scale)
    back = qz.from_fields(qz.to_fields(q), qz.QuantSpec.from_json(q.spec.to_json()))
    assert torch.equal(qz.dequantize(back), x_hat) and torch.isfinite(x_hat).all()


def test_an_all_zero_group_gets_the_scale_dtypes_epsilon(gen):
    x = torch.randn(4, 32, generator=gen)
    x[1, :16] = 0
    for scheme in ("symmetric", "asymmetric"):
        for dtype in ("float32", "float16"):
            q = qz.quantize_spec(x, _spec(x, 4, "group", 0, 16, scheme, dtype))
            assert float(q.scale[1, 0]) == torch.finfo(getattr(torch, dtype)).eps
            assert torch.equal(qz.dequantize(q)[1, :16], torch.zeros(16))


def _group_errors(x: torch.Tensor, x_hat: torch.Tensor, spec: qz.QuantSpec) -> torch.Tensor:
    """sum |x_hat - x|^2.4 per parameter group, float64."""
    group = _groups(x, spec).reshape(-1)
    err = (x_hat.double() - x.double()).abs().pow(2.4).reshape(-1)
    return torch.zeros(int(group.max()) + 1, dtype=torch.float64).index_add_(0, group, err)


@pytest.mark.parametrize("scheme,scale_dtype", SCHEME_DTYPES[1:])
@pytest.mark.parametrize("gran,dim,gs", [("tensor", 0, None), ("channel", 0, None), ("group", 0, 16)])
def test_mse_clipping_is_never_worse_per_group_in_its_own_norm(scheme, scale_dtype, gran, dim, gs, gen):
    x = torch.randn(37, 53, generator=gen) * torch.logspace(-1, 1, 37).unsqueeze(1)
    for bits in (2, 3, 4, 8):
        plain = qz.quantize_spec(x, _spec(x, bits, gran, dim, gs, scheme, scale_dtype))
        clip = qz.quantize_spec(x, _spec(x, bits, gran, dim, gs, scheme, scale_dtype, "mse"))
        e_plain = _group_errors(x, qz.dequantize(plain), plain.spec)
        e_clip = _group_errors(x, qz.dequantize(clip), clip.spec)
        # The search compares float32 sums of at most 53 * 37 terms: relative round-off <= 2e3 * 2**-24 ~ 1.2e-4.
        assert bool((e_clip <= e_plain * (1 + 1.2e-4)).all())
        if bits <= 4:  # Gaussian groups at 2-4 bits gain from clipping (the search is not a no-op)
            assert float(e_clip.sum()) < 0.97 * float(e_plain.sum())
        assert bool((clip.scale.float() <= plain.scale.float()).all())  # the shrunk range is what is stored


def test_json_without_the_scheme_keys_loads_as_the_published_quantizer(gen):
    old = {"shape": [6, 10], "bits": 4, "granularity": "group", "channel_dim": 0, "group_size": 4,
           "float_dtype": None}
    spec = qz.QuantSpec.from_json(old)
    assert (spec.scheme, spec.scale_dtype, spec.clip) == ("minmax", "float32", None)
    x = torch.randn(6, 10, generator=gen)
    q = qz.quantize(x, 4, "group", 0, 4)
    assert spec == q.spec
    assert torch.equal(qz.dequantize(qz.from_fields(qz.to_fields(q), spec)), qz.dequantize(q))


def test_invalid_scheme_combinations_are_refused():
    with pytest.raises(ValueError, match="minmax, symmetric, asymmetric"):
        qz.QuantSpec((2, 2), 4, scheme="absmax")
    with pytest.raises(ValueError, match="float32, float16"):
        qz.QuantSpec((2, 2), 4, scheme="symmetric", scale_dtype="bfloat16")
    with pytest.raises(ValueError, match="mse"):
        qz.QuantSpec((2, 2), 4, scheme="symmetric", clip="minmax")
    with pytest.raises(ValueError, match="minmax scheme stores float32"):
        qz.QuantSpec((2, 2), 4, scale_dtype="float16")
    with pytest.raises(ValueError, match="does not clip"):
        qz.QuantSpec((2, 2), 4, clip="mse")
    with pytest.raises(ValueError, match="spec is for"):
        qz.quantize_spec(torch.zeros(3, 2), qz.QuantSpec((2, 2), 4))


@pytest.mark.parametrize("scheme,scale_dtype", SCHEME_DTYPES)
@pytest.mark.parametrize("clip", [None, "mse"])
def test_fit_params_of_a_block_and_quantize_with_given_params(scheme, scale_dtype, clip, gen):
    """A group's parameters depend on its columns only; quantizing with the stored parameters gives the same codes."""
    if scheme == "minmax" and clip:
        return
    x = _with_zeros(gen)
    spec = _spec(x, 3, "group", 0, 16, scheme, scale_dtype, clip)
    q = qz.quantize_spec(x, spec)
    for cols in (slice(16, 32), slice(48, 53)):  # a full group and the short last one
        p = qz.fit_params(x[:, cols], spec)
        k = cols.start // 16
        assert torch.equal(p.scale, q.scale[:, k:k + 1])
        if scheme == "asymmetric":
            assert torch.equal(p.zero_point, q.zero_point[:, k:k + 1])
    assert torch.equal(qz.quantize_with(x, q.params, spec).codes, q.codes)


@pytest.mark.parametrize("scheme,scale_dtype", SCHEME_DTYPES)
@pytest.mark.parametrize("gran,dim,gs", AWKWARD)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_quantize_dequantize_spec_equals_the_two_steps(scheme, scale_dtype, gran, dim, gs, dtype, gen):
    x = _with_zeros(gen).to(dtype)
    spec = _spec(x, 5, gran, dim, gs, scheme, scale_dtype)
    q, x_hat = qz.quantize_dequantize_spec(x, spec, dtype)
    assert torch.equal(q.codes, qz.quantize_spec(x, spec).codes)
    assert x_hat.dtype == dtype and torch.equal(x_hat, qz.dequantize(qz.from_fields(qz.to_fields(q), q.spec), dtype))
