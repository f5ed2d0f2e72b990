"""`loaded_blocks` yields exactly what a loader returns, a row block at a time, and `blocked_errors` measures it as
`relative_error` and `weighted_relative_error` do on the whole tensor."""

from __future__ import annotations

import pytest
import torch

from lplr_convert.pipeline.experts import compress_experts
from lplr_convert.io.output import loaded_blocks, loaded_tensor
from lplr_convert.math.error import blocked_errors, relative_error
from lplr_convert.math.weighted import weighted_relative_error
from lplr_convert.methods import get_method, make_settings

CASES = [("lplr", {"rank_fraction": 0.5}), ("lsvd", {"b1": 16, "b2": 16, "rank_fraction": 1.0}),
         ("qlr", {"rank_fraction": 0.25}), ("qlr", {"rank": 0}), ("rtn", {"b0": 4}), ("laser", {"rho": 0.3})]


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("method", "knobs"), CASES)
def test_blocks_are_the_loaded_tensor_in_the_methods_orientation(method, knobs, dtype, transposed):
    gen = torch.Generator().manual_seed(3)
    W = torch.randn(37, 29, generator=gen).to(dtype)  # source orientation; the method sees W.T when transposed
    impl = get_method(method)
    res = impl.compress(W.T if transposed else W, make_settings(method, **knobs), 7)
    loaded = loaded_tensor(impl, res.parts, res.info, transposed, dtype)
    pairs = list(loaded_blocks(impl, res.parts, res.info, W, transposed, dtype))
    rows = torch.cat([w for w, _ in pairs])
    got = torch.cat([b for _, b in pairs])
    assert got.dtype == dtype
    assert torch.equal(rows, W.T if transposed else W)
    assert torch.equal(got, loaded.T if transposed else loaded)


def test_fused_experts_blocks_are_the_stacked_loaded_tensor():
    gen = torch.Generator().manual_seed(4)
    W = torch.randn(3, 12, 10, generator=gen).half()
    impl = get_method("lplr")
    res = compress_experts(impl, W, make_settings("lplr", rank_fraction=0.5), 9, True)
    loaded = loaded_tensor(impl, res.parts, res.info, True, torch.float16)
    pairs = list(loaded_blocks(impl, res.parts, res.info, W, True, torch.float16))
    assert torch.equal(torch.cat([b for _, b in pairs]), loaded.flatten(0, -2))
    assert torch.equal(torch.cat([w for w, _ in pairs]), W.flatten(0, -2))


def test_blocked_errors_equal_the_whole_tensor_errors():
    gen = torch.Generator().manual_seed(5)
    W = torch.randn(300, 40, generator=gen)
    W_hat = (W + 0.05 * torch.randn(300, 40, generator=gen)).half()
    X = torch.randn(500, 40, generator=gen) + 0.3
    H = X.T @ X / 500
    for rows in (7, 300):
        pairs = ((W[i:i + rows], W_hat[i:i + rows]) for i in range(0, 300, rows))
        rel, out, finite = blocked_errors(pairs, H)
        assert finite and rel.dtype == torch.float64
        assert float(rel) == pytest.approx(float(relative_error(W, W_hat)), rel=1e-12)
        assert float(out) == pytest.approx(float(weighted_relative_error(W, W_hat.float(), H)), rel=1e-12)
    one_block = blocked_errors([(W, W_hat)])  # one block: the very float64 reduction of relative_error
    assert float(one_block[0]) == float(relative_error(W, W_hat, block_rows=1 << 30)) and one_block[1] is None


def test_blocked_errors_see_every_non_finite_block_and_zero_matrices():
    W = torch.ones(6, 4, dtype=torch.float16)
    bad = W.clone()
    bad[5, 3] = float("inf")
    assert not blocked_errors((W[i:i + 2], bad[i:i + 2]) for i in range(0, 6, 2))[2]
    nan = W.clone()
    nan[0, 0] = float("nan")
    assert not blocked_errors([(W, nan)])[2]
    zero = torch.zeros(5, 3)
    rel, out, finite = blocked_errors([(zero, zero)], torch.eye(3))
    assert finite and float(rel) == 0.0 and float(out) == 0.0


def test_factored_weights_of_several_product_blocks_decode_alike():
    """9000 x 1024: two blocks of math.lowrank's schedule (8192 rows each)."""
    gen = torch.Generator().manual_seed(6)
    W = (torch.randn(9000, 8, generator=gen) @ torch.randn(8, 1024, generator=gen)).half()
    impl = get_method("lplr")
    res = impl.compress(W, make_settings("lplr", rank=6), 1)
    loaded = loaded_tensor(impl, res.parts, res.info, False, torch.float16)
    pairs = list(loaded_blocks(impl, res.parts, res.info, W, False, torch.float16))
    assert len(pairs) == 2 and torch.equal(torch.cat([b for _, b in pairs]), loaded)
