"""The packed kernels against the float decode: x @ M^T (and x @ M) from the stored fields equals the product with
`math.quantize.dequantize`'s matrix to float rounding, for every width, scheme and granularity; the CPU kernels'
layouts hold the very codes stored."""

from __future__ import annotations

import pytest
import torch

from lplr_convert.math import quantize as qz
from lplr_convert.runtime import kernels as K

EPS32 = torch.finfo(torch.float32).eps


def _stored(m: int, n: int, bits: int, granularity: str = "group", channel_dim: int = 0, group: int | None = 16,
            scheme: str = "asymmetric", scale_dtype: str = "float16", seed: int = 0):
    W = torch.randn(m, n, generator=torch.Generator().manual_seed(seed))
    spec = qz.QuantSpec((m, n), bits, granularity, channel_dim, group if granularity == "group" else None,
                        scheme=scheme, scale_dtype="float32" if scheme == "minmax" else scale_dtype)
    q = qz.quantize_spec(W, spec)
    return q.spec, qz.to_fields(q), qz.dequantize(q)


def _close(y: torch.Tensor, ref: torch.Tensor, x: torch.Tensor, W: torch.Tensor, rel: float = 0.0) -> None:
    """|y - ref| within two float32 matmul error bounds (2 k eps |x| |W|^T) plus `rel` of |x| |W|^T."""
    scale = x.abs().double() @ W.abs().double().T
    bound = (2 * x.shape[1] * EPS32 + rel) * scale + 1e-30
    err = (y.double() - ref.double()).abs()
    assert (err <= bound).all(), float((err / bound).max())


GRID = [(bits, gran, cd, scheme) for bits in (1, 2, 3, 4, 5, 8) for gran, cd in
        (("group", 0), ("channel", 0), ("channel", 1), ("tensor", 0)) for scheme in qz.SCHEMES]


@pytest.mark.parametrize("bits,gran,cd,scheme", GRID)
def test_tiled_product_equals_the_dequantized_product(bits, gran, cd, scheme):
    """Several tiles (tile_bytes of 16 rows) and a short last one (m = 44), a ragged last group (n = 40)."""
    spec, fields, W = _stored(44, 40, bits, gran, cd, 16, scheme)
    x = torch.randn(5, 40, generator=torch.Generator().manual_seed(1))
    y = K.tiled_matmul(x, spec, fields, tile_bytes=16 * 40 * 4)
    _close(y, x @ W.T, x, W)
    xt = torch.randn(3, 44, generator=torch.Generator().manual_seed(2))
    _close(K.tiled_matmul(xt, spec, fields, transpose=False, tile_bytes=16 * 40 * 4), xt @ W, xt, W.T)


@pytest.mark.parametrize("bits", [3, 4, 7])
def test_dequantized_rows_are_the_loaders_rows_bit_for_bit(bits):
    spec, fields, W = _stored(40, 24, bits, "group", 0, 16, "asymmetric")
    for start, stop in ((0, 8), (8, 24), (32, 40)):
        assert torch.equal(K.dequantize_rows(spec, fields, start, stop, torch.float32), W[start:stop])
        assert torch.equal(K.dequantize_rows(spec, fields, start, stop, torch.bfloat16), W[start:stop].bfloat16())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tiled_product_in_half_precision_uses_the_loaders_half_weights(dtype):
    spec, fields, W = _stored(48, 64, 4, "group", 0, 32, "symmetric")
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(3)).to(dtype)
    y = K.tiled_matmul(x, spec, fields, tile_bytes=16 * 64 * 4)
    ref = torch.nn.functional.linear(x.float(), W.to(dtype).float())
    _close(y, ref, x.float(), W, rel=torch.finfo(dtype).eps)


def test_float_parts_multiply_as_stored():
    W = torch.randn(24, 16)
    spec = qz.quantize_spec(W, qz.QuantSpec((24, 16), 16)).spec
    fields = qz.to_fields(qz.quantize_spec(W, spec))
    x = torch.randn(3, 16)
    ref = x @ fields[""].float().T
    _close(K.tiled_matmul(x, spec, fields, tile_bytes=8 * 16 * 4), ref, x, W)
    xh = x.to(fields[""].dtype)
    assert torch.equal(K.tiled_matmul(xh, spec, fields), torch.nn.functional.linear(xh, fields[""]))


@pytest.mark.skipif(not K.int4pack_available(), reason="torch has no CPU int4pack kernel here")
@pytest.mark.parametrize("m,n,gran,group", [(80, 128, "group", 32), (48, 160, "group", 64), (64, 576, "group", 128),
                                            (32, 96, "channel", None), (16, 64, "tensor", None)])
@pytest.mark.parametrize("scheme", qz.SCHEMES)
def test_int4pack_runs_the_stored_codes(m, n, gran, group, scheme):
    spec, fields, W = _stored(m, n, 4, gran, 0, group, scheme)
    segments = K.int4pack_segments(spec)
    assert segments is not None and segments[-1][1] == n
    weights = K.int4pack_weight(fields["packed"], spec, segments)
    assert sum(w.numel() for w in weights) == fields["packed"].numel()  # the same bytes, another order
    assert torch.equal(K.int4pack_packed(weights, spec), fields["packed"])
    if m % 64 == 0 or m < 64:  # torch's own conversion agrees with ours block by block
        codes = qz.from_fields(fields, spec).codes.to(torch.int32)
        for w, (a, b, _) in zip(weights, segments):
            assert torch.equal(w, torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes[:, a:b].contiguous(), 1))
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(4))
    sz = K.int4pack_scales_zeros(spec, fields, segments, torch.float32)
    _close(K.int4pack_linear(x, weights, segments, sz), x @ W.T, x, W)
    xb = x.bfloat16()
    szb = K.int4pack_scales_zeros(spec, fields, segments, torch.bfloat16)
    # the kernel's own weights: (c - 8) s + z with s and z rounded to bfloat16
    codes = qz.from_fields(fields, spec).codes.float()
    Wk = torch.cat([(codes[:, a:b].view(m, -1, g) - 8).mul(s[..., 0].T.float().unsqueeze(-1))
                    .add(s[..., 1].T.float().unsqueeze(-1)).view(m, b - a) for (a, b, g), s in zip(segments, szb)], 1)
    _close(K.int4pack_linear(xb, weights, segments, szb), xb.float() @ Wk.T, xb.float(), Wk,
           rel=torch.finfo(torch.bfloat16).eps)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_int4pack_check_passes_where_the_kernel_is_right(device):
    """The self-check every device's int4pack passes before it is used (on CUDA: the tinygemm layout and arithmetic
    this module assumes); a device without the kernel is refused."""
    assert K.int4pack_check(device) and K.int4pack_available(device)
    assert not K.int4pack_available("meta")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,n,pad", [(80, 128, False), (48, 160, False), (27, 576, True), (100, 40, True)])
def test_the_kernel_reads_back_the_codes_it_holds(device, m, n, pad):
    """`int4pack_kernel_codes` (identity rows, s = 1, z = 8: how the opaque CUDA layout gives its codes back) returns
    the stored codes exactly from either layout, padded rows and columns dropped, in tiles of any size."""
    spec, fields, _ = _stored(m, n, 4, "group", 0, 32, "asymmetric")
    segments = K.int4pack_segments(spec, pad)
    layout = K.int4pack_layout(device)
    weights = K.int4pack_weight(fields["packed"].to(device), spec, segments, layout)
    codes = qz.from_fields(fields, spec).codes
    for tile in (64, 4 << 20):
        got = K.int4pack_kernel_codes(K.int4pack_mm(device), weights, segments, m, n, tile_bytes=tile)
        assert torch.equal(got.cpu(), codes)


def test_int4pack_refuses_what_it_cannot_run():
    spec = lambda *a, **k: qz.QuantSpec(*a, **k)
    assert K.int4pack_segments(spec((64, 64), 3, "group", 0, 32)) is None  # not 4-bit
    assert K.int4pack_segments(spec((40, 64), 4, "group", 0, 32)) is None  # rows not a multiple of 16
    assert K.int4pack_segments(spec((64, 64), 4, "group", 0, 16)) is None  # group the kernel lacks
    assert K.int4pack_segments(spec((64, 64), 4, "channel", 1)) is None  # scales along the input dim
    assert K.int4pack_segments(spec((64, 80), 4, "group", 0, 64)) is None  # a last group of 16 columns


@pytest.mark.parametrize("gran", ["channel", "tensor"])
@pytest.mark.parametrize("scheme", qz.SCHEMES)
def test_int8pack_runs_the_stored_codes(gran, scheme):
    spec, fields, W = _stored(40, 72, 8, gran, 0, None, scheme)
    w = K.int8pack_weight(fields["packed"], spec)
    assert w.dtype == torch.int8 and w.numel() == fields["packed"].numel()
    assert torch.equal(K.int8pack_codes(w, 0, 40).reshape(-1), fields["packed"])
    x = torch.randn(3, 72, generator=torch.Generator().manual_seed(5))
    # the zero point enters as o * sum(x): cancellation against sum(x) adds |o| |sum x| eps
    y = K.int8pack_linear(x, w, fields["scale"], K.int8pack_offset(spec, fields))
    _close(y, x @ W.T, x, W, rel=4 * EPS32 * 128)
