"""PackedLinear from each method's stored layout equals the float module the loaders build otherwise (LowRankLinear
for factored methods, a dense nn.Linear for rtn/gptq) to float rounding: per method and width (2, 3, 4, 8 bits and
float16 factors), granularity and scheme, input batch shape and dtype, Conv1D orientation, and kernel choice."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lplr_convert.errors import LplrError
from lplr_convert.hf.modeling import LowRankLinear
from lplr_convert.methods import get_method, make_settings
from lplr_convert.runtime.modules import ENV_KERNEL, PackedLinear, PackedMatrix, kernel_counts

EPS32 = torch.finfo(torch.float32).eps

CASES = [
    ("rtn", {"b0": 4, "quantizer": "group", "group_size": 32, "scheme": "asymmetric"}),
    ("rtn", {"b0": 4, "quantizer": "group", "group_size": 32, "scheme": "minmax"}),
    ("rtn", {"b0": 3, "quantizer": "channel", "scheme": "symmetric"}),
    ("rtn", {"b0": 8}),
    ("rtn", {"b0": 8, "quantizer": "tensor", "scheme": "asymmetric"}),
    ("rtn", {"b0": 2, "quantizer": "group", "group_size": 16, "scheme": "asymmetric", "scale_dtype": "float32"}),
    ("gptq", {"b0": 4, "quantizer": "group", "group_size": 64, "scheme": "symmetric"}),
    ("lplr", {"b1": 8, "b2": 4, "rank_fraction": 0.5}),
    ("lplr", {"b1": 2, "b2": 3, "rank": 16, "scheme": "asymmetric"}),
    ("lsvd", {"b1": 4, "b2": 4, "rank": 16}),
    ("dsvd", {"b1": 16, "b2": 8, "rank": 8}),
    ("qlr", {"b0": 4, "rank": 16, "quantizer": "group", "group_size": 32, "scheme": "asymmetric"}),
    ("qlr", {"b0": 2, "rank": 4}),
    ("qlr", {"b0": 3, "rank": 0}),
]
OUT, IN = 96, 128


def _compressed(method: str, knobs: dict, shape=(OUT, IN), seed: int = 0):
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) / shape[1] ** 0.5
    m = get_method(method)
    res = m.compress(W, make_settings(method, **knobs), seed=3)
    return m, res


def _float_module(m, res, bias) -> nn.Module:
    """What load_model(packed=False) builds: LowRankLinear (Q + L R) for factored methods, nn.Linear otherwise."""
    if m.factored:
        L, R = m.decode_factors(res.parts, res.info)
        return LowRankLinear(L, R, bias, m.decode_base(res.parts, res.info))
    W = m.decode(res.parts, res.info)
    lin = nn.Linear(W.shape[1], W.shape[0], bias=bias is not None)
    lin.weight.data, lin.bias = W, None if bias is None else nn.Parameter(bias)
    return lin


def _bound(x: torch.Tensor, mod: PackedLinear, rel: float) -> torch.Tensor:
    """A float-rounding bound for one output: the matmul bound over |x| |Q| + |x| |R|^T |L|^T (two products)."""
    x = x.reshape(-1, x.shape[-1]).double().abs()
    b = torch.zeros(x.shape[0], mod.out_features, dtype=torch.float64)
    if mod.backbone is not None:
        b += x @ mod.backbone.dense().double().abs().T
    if mod.left is not None:
        b += (x @ mod.right.dense().double().abs().T) @ mod.left.dense().double().abs().T
    return (4 * IN * EPS32 + rel) * b + 1e-30


@pytest.mark.parametrize("method,knobs", CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
@pytest.mark.parametrize("kernel", ["auto", "tiled", "int4pack", "int8pack"])
def test_packed_forward_equals_the_float_module(method, knobs, kernel):
    m, res = _compressed(method, knobs)
    bias = torch.randn(OUT)
    ref = _float_module(m, res, bias)
    mod = PackedLinear(m.layout(res.info), res.parts, bias.clone(), kernel=kernel)
    x = torch.randn(2, 5, IN, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y, want = mod(x), ref(x)
    assert y.shape == want.shape == (2, 5, OUT) and y.dtype == torch.float32
    err = (y - want).abs().reshape(-1, OUT).double()
    assert (err <= _bound(x, mod, 0.0)).all()
    assert torch.equal(mod.to_dense(), m.decode(res.parts, res.info))
    assert torch.equal(mod.weight, m.decode(res.parts, res.info))  # formed on access
    if kernel == "tiled":
        assert set(mod.kernels) == {"tiled"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("idx", [0, 3, 7, 11])
def test_half_precision_inputs_match_the_half_float_module(dtype, idx):
    method, knobs = CASES[idx]
    m, res = _compressed(method, knobs)
    ref = _float_module(m, res, None).to(dtype)
    mod = PackedLinear(m.layout(res.info), res.parts, None, dtype=dtype)
    for t in (1, 40):  # decode-sized inputs may take the CPU kernels, longer ones the tiled path
        x = torch.randn(t, IN, generator=torch.Generator().manual_seed(t)).to(dtype)
        with torch.no_grad():
            y, want = mod(x), ref(x)
        assert y.dtype == dtype
        err = (y.double() - want.double()).abs()
        # both round the weights and the output to `dtype` (the kernels their scales too): a few units of it
        assert (err <= _bound(x, mod, 8 * torch.finfo(dtype).eps)).all()


def test_conv1d_orientation_runs_the_transposed_product():
    """A Conv1D weight stored as the method saw it (in x out, rec.transposed False): y = x Q + (x L) R."""
    m, res = _compressed("qlr", {"b0": 4, "rank": 8, "quantizer": "group", "group_size": 32}, shape=(IN, OUT))
    W = m.decode(res.parts, res.info)  # in x out
    mod = PackedLinear(m.layout(res.info), res.parts, None, conv1d=True)
    assert (mod.in_features, mod.out_features) == (IN, OUT) and set(mod.kernels) == {"tiled"}
    x = torch.randn(3, IN)
    assert torch.allclose(mod(x), x @ W, atol=1e-5, rtol=1e-5)
    assert torch.equal(mod.weight, W.T)


def test_kernel_choice_is_recorded_overridable_and_falls_back(monkeypatch):
    m, res = _compressed(*CASES[0])
    mod = PackedLinear(m.layout(res.info), res.parts, dtype=torch.bfloat16)
    assert mod.kernels == ["int4pack"] and "kernel=int4pack" in repr(mod)
    assert kernel_counts([mod]) == {"int4pack": 1}
    # float32 models: int4pack's float32 path is slower than the tiled one (scripts/bench_kernels.py)
    assert PackedLinear(m.layout(res.info), res.parts, dtype=torch.float32).kernels == ["tiled"]
    assert PackedLinear(m.layout(res.info), res.parts, kernel="int4pack").kernels == ["int4pack"]
    monkeypatch.setenv(ENV_KERNEL, "tiled")
    assert PackedLinear(m.layout(res.info), res.parts, dtype=torch.bfloat16).kernels == ["tiled"]
    monkeypatch.setenv(ENV_KERNEL, "fastest")
    with pytest.raises(LplrError, match="kernel 'fastest' is unknown; use one of auto, tiled, int4pack, int8pack"):
        PackedLinear(m.layout(res.info), res.parts)
    monkeypatch.delenv(ENV_KERNEL)
    m3, res3 = _compressed(*CASES[2])  # 3-bit: int4pack cannot run it
    from loguru import logger

    seen = []
    handler = logger.add(seen.append, level="WARNING")
    try:
        mod3 = PackedLinear(m3.layout(res3.info), res3.parts, kernel="int4pack")
    finally:
        logger.remove(handler)
    assert mod3.kernels == ["tiled"] and any("kernel int4pack cannot run" in str(s) for s in seen)


def test_moving_off_the_cpu_puts_the_codes_back_as_stored():
    """The CPU layouts hold the same bytes; relaid to the stored packing (as on another device), the module still
    computes the same product."""
    m, res = _compressed(*CASES[0])
    mod = PackedLinear(m.layout(res.info), res.parts, dtype=torch.bfloat16)
    assert mod.kernels == ["int4pack"]
    x = torch.randn(4, IN)
    y = mod(x)
    stored = mod.backbone.stored()
    assert torch.equal(stored["packed"], res.parts["lplr_q.packed"])
    mod.backbone.set_kernel("tiled")
    assert set(dict(mod.named_buffers())) == {"backbone.packed", "backbone.scale", "backbone.zero_point"}
    assert torch.allclose(mod(x), y, atol=1e-5)


@pytest.mark.parametrize("group,scheme,cached", [(128, "asymmetric", True), (128, "symmetric", True),
                                                 (64, "asymmetric", True), (64, "symmetric", False),
                                                 (32, "asymmetric", False)])
def test_int4pack_holds_its_scales_and_zeros_where_they_cost_at_most_five_percent(group, scheme, cached, monkeypatch):
    """bfloat16/float16 modules keep int4pack's scales-and-zeros (4 bytes a group) in place of the stored parameters
    where the matrix then holds <= 1.05 x its stored bytes (group 128: 1.03; 64 asymmetric: 1.043; 64 symmetric:
    1.059 and 32: over, formed at each call); the product is the very one formed at each call; the stored form comes
    back: codes and zero points exactly, float16 scales exactly in float16 and rounded to bfloat16 in bfloat16."""
    from lplr_convert.runtime import modules

    shape = (64, 256)
    m, res = _compressed("rtn", {"b0": 4, "quantizer": "group", "group_size": group, "scheme": scheme}, shape=shape)
    stored = sum(t.numel() * t.element_size() for t in res.parts.values())
    x = torch.randn(3, shape[1], generator=torch.Generator().manual_seed(5))
    for dtype in (torch.bfloat16, torch.float16):
        mod = PackedLinear(m.layout(res.info), res.parts, dtype=dtype)
        pm = mod.backbone
        assert pm.kernel == "int4pack" and pm.cached is cached
        assert ("scales-and-zeros held in" in repr(mod)) is cached
        held = sum(b.numel() * b.element_size() for b in mod.buffers())
        assert held <= 1.05 * stored and (held == stored) is not cached, (held, stored)
        names = {n for n, _ in mod.named_buffers()}
        assert ("backbone.scale" in names) is not cached and ("backbone.int4pack_sz_0" in names) is cached
        monkeypatch.setattr(modules, "INT4PACK_CACHE_OVERHEAD", -1.0)
        formed = PackedLinear(m.layout(res.info), res.parts, dtype=dtype)
        monkeypatch.undo()
        assert not formed.backbone.cached
        with torch.no_grad():
            assert torch.equal(mod(x.to(dtype)), formed(x.to(dtype)))
            long = torch.randn(40, shape[1]).to(dtype)  # the tiled path, from the parameters given back
            assert (mod(long).double() - formed(long).double()).abs().max() <= \
                4 * torch.finfo(dtype).eps * (long.double().abs() @ formed.backbone.dense().double().abs().T).max()
        back = pm.stored()
        for field, want in res.parts.items():
            got = back[field.split(".")[-1]]
            if field.endswith("scale") and dtype == torch.bfloat16 and cached:
                assert torch.allclose(got.float(), want.float(), rtol=2 ** -8, atol=0)
            else:
                assert torch.equal(got, want), field
        meta = PackedMatrix.meta(pm.spec, dtype=dtype, pad=pm.pad, cache=pm.cache)
        assert {n: (b.shape, b.dtype) for n, b in meta.named_buffers()} == \
            {n: (b.shape, b.dtype) for n, b in pm.named_buffers()}
        pm.set_kernel("tiled")  # as on another device: the stored parameters back in their buffers
        assert not pm.cached and {n for n, _ in pm.named_buffers()} == \
            {f.split(".")[-1] for f in res.parts}


def test_balance_spends_one_budget_over_the_model_and_pads_thin_factors():
    """A rank-4 qlr layer alone cannot pad its factors to int4pack's shapes within 5 % of its own bytes; next to a
    plain 4-bit layer with room to spare, `balance` pads them (one budget: 1.05 x the stored bytes of both) and the
    products stay those of the float modules."""
    from lplr_convert.runtime.modules import balance

    ma, ra = _compressed("rtn", {"b0": 4, "quantizer": "group", "group_size": 128, "scheme": "symmetric"},
                         shape=(512, 512))
    mb, rb = _compressed("qlr", {"b0": 4, "rank": 4, "quantizer": "group", "group_size": 128}, shape=(64, 128))
    a = PackedLinear(ma.layout(ra.info), ra.parts, dtype=torch.bfloat16)
    b = PackedLinear(mb.layout(rb.info), rb.parts, dtype=torch.bfloat16)
    assert a.backbone.cached and b.kernels == ["int4pack", "tiled", "tiled"]
    x = torch.randn(2, 128, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    with torch.no_grad():
        before = b(x)
    model = nn.ModuleList([a, b])
    balance(model)
    assert b.kernels == ["int4pack", "int4pack", "int4pack"] and b.left.pad and b.right.pad
    assert a.backbone.cached and b.left.cached and b.right.cached
    held = sum(t.numel() * t.element_size() for t in model.buffers())
    stored = sum(t.numel() * t.element_size() for r in (ra, rb) for t in r.parts.values())
    assert stored < held <= 1.05 * stored
    ref = _float_module(mb, rb, None).to(torch.bfloat16)
    with torch.no_grad():
        after, want = b(x), ref(x)
    bound = _bound(x, b, 8 * torch.finfo(torch.bfloat16).eps)  # as test_half_precision_inputs...: a few units
    assert ((after.double() - want.double()).abs() <= bound).all()
    assert ((before.double() - want.double()).abs() <= bound).all()
    back = {f"lplr_{side}.{f}": t for side, mat in (("left", b.left), ("right", b.right))
            for f, t in mat.stored().items()}
    for name, t in rb.parts.items():  # the padded factors give their stored codes and zero points back exactly
        if name.startswith(("lplr_left", "lplr_right")):
            got = back[name]
            assert torch.equal(got, t) if not name.endswith("scale") else \
                torch.allclose(got.float(), t.float(), rtol=2 ** -8, atol=0), name
    balance(model)  # planned again: the same layout
    assert b.kernels == ["int4pack", "int4pack", "int4pack"]


def test_packed_bytes_are_the_stored_bytes():
    for method, knobs in CASES:
        m, res = _compressed(method, knobs)
        mod = PackedLinear(m.layout(res.info), res.parts)
        held = sum(b.numel() * b.element_size() for b in mod.buffers())
        stored = sum(t.numel() * t.element_size() for t in res.parts.values())
        assert held == stored, (method, knobs, held, stored)


def test_a_dtype_cast_keeps_the_stored_bytes_and_chooses_the_kernel_again():
    """`.to(bfloat16)` makes bfloat16 the activation dtype (int4pack for 4-bit matrices, scales-and-zeros formed
    again) without casting the stored float16 scales; back to float32, the same stored bytes."""
    m, res = _compressed("qlr", {"b0": 4, "rank": 16, "quantizer": "group", "group_size": 32, "scheme": "asymmetric"})
    mod = PackedLinear(m.layout(res.info), res.parts, torch.randn(OUT))
    assert mod.backbone.kernel == "tiled"  # float32: the tiled path is the faster one
    stored = {k: v.clone() for k, v in mod.backbone.stored().items()}
    mod.to(torch.bfloat16)
    assert mod.dtype == mod.backbone.dtype == torch.bfloat16 and mod.bias.dtype == torch.bfloat16
    assert mod.backbone.kernel == "int4pack"
    got = mod.backbone.stored()
    assert got.keys() == stored.keys() and all(torch.equal(got[k], v) for k, v in stored.items())
    mod.bias = None
    ref = _float_module(m, res, None).to(torch.bfloat16)
    x = torch.randn(3, IN, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    with torch.no_grad():
        err = (mod(x).double() - ref(x).double()).abs()
    assert (err <= _bound(x.float(), mod, 8 * torch.finfo(torch.bfloat16).eps)).all()
    mod.float()
    assert mod.backbone.kernel == "tiled" and mod.dtype == torch.float32
    got = mod.backbone.stored()
    assert all(torch.equal(got[k], v) for k, v in stored.items())


def _cuda_cases():
    return [(m, k) for m, k in CASES if k.get("b0") == 4 or m in ("lplr", "lsvd")]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method,knobs", _cuda_cases())
def test_bfloat16_modules_run_the_cuda_int4pack_kernel(method, knobs):
    """On CUDA a bfloat16 module runs 4-bit matrices on tinygemm (`_weight_int4pack_mm`, after the device passed
    `int4pack_check`), for decode and prefill inputs; its products equal the float module's to bfloat16 rounding;
    the stored codes come back exactly through the kernel; back on the CPU, the CPU layout."""
    m, res = _compressed(method, knobs)
    ref = _float_module(m, res, None).to("cuda", torch.bfloat16)
    mod = PackedLinear(m.layout(res.info), res.parts, None, dtype=torch.bfloat16).to("cuda")
    four = [mat for mat in (mod.backbone, mod.left, mod.right) if mat is not None and mat.spec.bits == 4
            and mat.spec.shape[0] % 16 == 0 and mat.spec.shape[1] % 32 == 0]
    assert all(mat.kernel == "int4pack" and mat.layout == "cuda" for mat in four)
    for t in (1, 40):
        x = torch.randn(t, IN, generator=torch.Generator().manual_seed(t)).to("cuda", torch.bfloat16)
        with torch.no_grad():
            y, want = mod(x), ref(x)
        err = (y.double() - want.double()).abs().cpu()
        assert (err <= _bound(x.cpu().float(), mod.cpu().cuda(), 8 * torch.finfo(torch.bfloat16).eps)).all()
    back = {k: v.cpu() for mat in mod._matrices().values() for k, v in mat.stored().items()}
    assert len(back) and all(torch.equal(back[k], v) for k, v in res.parts.items() if k in back and
                             not k.endswith("scale"))
    mod.cpu()
    assert all(mat.layout in (None, "cpu") for mat in mod._matrices().values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_modules_run_on_cuda(dtype):
    """Moved to a GPU, the CPU layouts go back to the stored packing and the tiled path runs there (a float32
    module: the CUDA int4pack kernel multiplies bfloat16 only)."""
    for method, knobs in CASES:
        m, res = _compressed(method, knobs)
        ref = _float_module(m, res, None).to("cuda", dtype)
        mod = PackedLinear(m.layout(res.info), res.parts, None).to("cuda")
        assert set(mod.kernels) == {"tiled"}
        x = torch.randn(3, IN, device="cuda").to(dtype)
        with torch.no_grad():
            y, want = mod(x), ref(x)
        err = (y.double() - want.double()).abs().cpu()
        assert (err <= _bound(x.cpu().float(), mod.cpu(), 8 * torch.finfo(dtype).eps)).all(), (method, knobs)
