"""`--incoherence hadamard` of gptq and qlr at the method and module level: the stored codes are of W' = U W V^T (the
seed recorded in the info), every decode returns the original basis, the layout carries the transform, the packed
module computes U^T (W' (V x)) equal to the float modules to float rounding, and bad values are one-line errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lplr_convert import constants as C
from lplr_convert.errors import LplrError
from lplr_convert.hf.modeling import LowRankLinear
from lplr_convert.math.error import relative_error
from lplr_convert.math.hadamard import Incoherence
from lplr_convert.math.lowrank import product
from lplr_convert.methods import InputStats, get_method, make_settings
from lplr_convert.methods.base import incoherence_of
from lplr_convert.runtime.modules import PackedLinear

EPS32 = torch.finfo(torch.float32).eps
OUT, IN = 96, 160  # 3 x 32 and 5 x 32: odd factors on both sides
CASES = [
    ("gptq", {"b0": 4, "quantizer": "group", "group_size": 32}),
    ("qlr", {"b0": 3, "rank": 8, "quantizer": "group", "group_size": 32}),
    ("qlr", {"b0": 2, "rank": 0}),
]


def _weight(shape=(OUT, IN), seed=0) -> torch.Tensor:
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) / shape[1] ** 0.5
    W[:, 7] *= 20  # an outlier input channel: what incoherence spreads out
    return W


def _stats(n: int) -> InputStats:
    X = torch.randn(4 * n, n, generator=torch.Generator().manual_seed(5)) * torch.linspace(0.1, 3, n)
    return InputStats(X.T @ X / X.shape[0], key="x")


def _compressed(method, knobs, shape=(OUT, IN), stats=None, seed=42):
    m = get_method(method)
    return m, m.compress(_weight(shape), make_settings(method, **knobs, incoherence="hadamard"), seed, stats)


def _dequantized(m, res):
    """The stored matrices decoded as they are (rotated basis): Q', L', R' (None where absent)."""
    layout = m.layout(res.info)
    return tuple(None if p is None else p.dequantized(res.parts) for p in (layout.backbone, layout.left, layout.right))


@pytest.mark.parametrize("method,knobs", CASES)
@pytest.mark.parametrize("calibrated", [False, True])
def test_stored_codes_are_of_the_rotated_weight_and_decode_returns_the_original_basis(method, knobs, calibrated):
    m, res = _compressed(method, knobs, stats=_stats(IN) if calibrated else None)
    assert res.info[C.INFO_INCOHERENCE] == {"kind": "hadamard", "seed": 42}
    T = Incoherence((OUT, IN), 42)
    U, V = T.out.dense(), T.inp.dense()
    Q, L, R = _dequantized(m, res)
    stored = Q.double() + (L.double() @ R.double() if L is not None else 0)  # W' as stored
    W = m.decode(res.parts, res.info)
    assert torch.allclose(W.double(), U.T @ stored @ V, atol=1e-5)
    # the relative error the method reports is the original basis's (U, V orthogonal)
    assert res.error() == pytest.approx(float(relative_error(_weight(), W)), rel=1e-4)
    layout = m.layout(res.info)
    assert layout.transform == T
    if m.factored:  # the float modules' factors: U^T L', R' V, U^T Q' V, the same bits as decode
        Lo, Ro = m.decode_factors(res.parts, res.info)
        assert torch.equal(product(Lo, Ro, m.decode_base(res.parts, res.info)), W)


def test_the_transform_spreads_an_outlier_and_does_not_hurt_here():
    """The published gptq is untouched (no info key, same bytes); with the transform the outlier column's error is
    spread: the weight error at 3 bits is below the plain one on this outlier-heavy matrix."""
    W = _weight()
    gptq = get_method("gptq")
    s = {"b0": 3, "quantizer": "group", "group_size": 32}
    plain = gptq.compress(W, make_settings("gptq", **s), 42)
    again = gptq.compress(W, make_settings("gptq", **s, incoherence="none"), 42)
    assert C.INFO_INCOHERENCE not in plain.info
    assert all(torch.equal(plain.parts[k], again.parts[k]) for k in plain.parts)
    rotated = gptq.compress(W, make_settings("gptq", **s, incoherence="hadamard"), 42)
    assert rotated.error() < 0.8 * plain.error()


def _float_module(m, res, bias) -> nn.Module:
    if m.factored:
        L, R = m.decode_factors(res.parts, res.info)
        return LowRankLinear(L, R, bias, m.decode_base(res.parts, res.info))
    lin = nn.Linear(IN, OUT, bias=bias is not None)
    lin.weight.data = m.decode(res.parts, res.info)
    if bias is not None:
        lin.bias.data = bias
    return lin


@pytest.mark.parametrize("method,knobs", CASES)
@pytest.mark.parametrize("kernel", ["auto", "tiled", "int4pack"])
def test_packed_forward_equals_the_float_module(method, knobs, kernel):
    m, res = _compressed(method, knobs)
    bias = torch.randn(OUT)
    ref = _float_module(m, res, bias)
    mod = PackedLinear(m.layout(res.info), res.parts, bias.clone(), kernel=kernel)
    assert "incoherence=hadamard" in repr(mod)
    x = torch.randn(2, 5, IN, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y, want = mod(x), ref(x)
    assert y.shape == want.shape == (2, 5, OUT)
    W = m.decode(res.parts, res.info)
    # float32 rounding of two products and two orthogonal transforms: a few n eps |x| ||w_i|| per output
    bound = 8 * (IN + OUT) * EPS32 * x.norm(dim=-1, keepdim=True) * W.norm(dim=1)
    assert ((y - want).abs() <= bound).all()
    assert torch.equal(mod.to_dense(), W) and torch.equal(mod.weight, W)
    held = sum(b.numel() * b.element_size() for b in mod.buffers())
    assert held == sum(t.numel() * t.element_size() for t in res.parts.values())  # the transform is no buffer


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    m, res = _compressed(*CASES[0])
    ref = _float_module(m, res, None)
    mod = PackedLinear(m.layout(res.info), res.parts, None, dtype=dtype)
    for t in (1, 40):
        x = torch.randn(t, IN, generator=torch.Generator().manual_seed(t))
        with torch.no_grad():
            y, want = mod(x.to(dtype)), ref(x.to(dtype).float())
        assert y.dtype == dtype
        bound = 16 * torch.finfo(dtype).eps * x.norm(dim=-1, keepdim=True) * ref.weight.norm(dim=1)
        assert ((y.double() - want.double()).abs() <= bound).all()


def test_conv1d_orientation():
    """A Conv1D weight as the method saw it (in x out): y = x M, M = U^T M' V."""
    m, res = _compressed("qlr", CASES[1][1], shape=(IN, OUT))
    M = m.decode(res.parts, res.info)  # in x out
    mod = PackedLinear(m.layout(res.info), res.parts, None, conv1d=True)
    x = torch.randn(3, IN)
    assert torch.allclose(mod(x), x @ M, atol=1e-5, rtol=1e-5)
    assert torch.equal(mod.weight, M.T)


def test_calibrated_budget_candidates_use_the_tensors_rotation():
    """The budget's first pass quantizes the backbone in the rotated basis of the tensor's seed, so the conversion
    reuses it (`BACKBONES`) and gets the same bytes as computing it."""
    from lplr_convert.methods._common import BACKBONES

    qlr, W, stats = get_method("qlr"), _weight(), _stats(IN)
    s = make_settings("qlr", rank=8, incoherence="hadamard")
    BACKBONES.clear()
    cands = qlr.candidates(W, s, stats, 4.25, frozenset({"rank"}), seed=42)
    assert len(cands) == 1 and len(BACKBONES.entries) == 1
    from dataclasses import replace

    s4 = replace(s, **cands[0].changes)
    reused = qlr.compress(W, s4, 42, stats)
    assert not BACKBONES.entries  # taken
    fresh = qlr.compress(W, s4, 42, stats)
    assert all(torch.equal(reused.parts[k], fresh.parts[k]) for k in fresh.parts)


def test_bad_knob_values_are_one_line_errors():
    with pytest.raises(LplrError, match="incoherence 'random' is unknown; use one of none, hadamard"):
        make_settings("gptq", incoherence="random")
    with pytest.raises(LplrError, match="incoherence must be text"):
        make_settings("qlr", incoherence=1)


@pytest.mark.parametrize("record,needle", [
    ({"kind": "hadamard", "seed": -3}, "incoherence seed -3 is not an integer"),
    ({"kind": "hadamard", "seed": "12"}, "incoherence seed '12' is not an integer"),
    ({"kind": "givens", "seed": 1}, "kind 'givens' is unknown"),
    ({"seed": 1}, "is not {'kind': 'hadamard', 'seed': N}"),
    ([1], "is not {'kind': 'hadamard', 'seed': N}"),
])
def test_malformed_records_are_refused_naming_the_problem(record, needle):
    m, res = _compressed(*CASES[0])
    info = {**res.info, C.INFO_INCOHERENCE: record}
    for call in (lambda: m.layout(info), lambda: m.decode(res.parts, info), lambda: incoherence_of(info, (OUT, IN))):
        with pytest.raises(ValueError, match=needle.replace("{", "[{]").replace("}", "[}]")):
            call()
