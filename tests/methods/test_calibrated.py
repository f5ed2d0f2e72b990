"""Activation-aware methods, exact properties: GPTQ with H = I is RTN; qlr with rank 0 is its GPTQ backbone and is
never worse than it; calibrated LSVD with float factors reaches the weighted Eckart-Young optimum (so it beats plain
LSVD's weighted error); every method accepts and ignores statistics it does not use."""

from __future__ import annotations

import torch

from lplr_convert.math.weighted import weighted_relative_error
from lplr_convert.math.whiten import whitened_singular_values, whitening
from lplr_convert.methods import InputStats, RankPolicy, available_methods, get_method, make_settings


def _problem(m=48, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g) / n**0.5
    X = torch.randn(4 * n, n, generator=g) @ torch.diag(torch.logspace(0, -2, n)) @ torch.randn(n, n, generator=g)
    H = (X.T @ X / X.shape[0]).float()
    return W, H


def _out_err(method, res, W, H):
    return float(weighted_relative_error(W, get_method(method).decode(res.parts, res.info), H))


def test_gptq_with_identity_statistics_is_round_to_nearest():
    W, _ = _problem()
    for kw in ({}, {"scheme": "asymmetric", "quantizer": "channel"}, {"b0": 3, "clip": "mse"}):
        s = make_settings("gptq", **kw)
        plain = get_method("gptq").compress(W, s, 0)
        ident = get_method("gptq").compress(W, s, 0, InputStats(torch.eye(W.shape[1])))
        rtn = get_method("rtn").compress(W, make_settings("rtn", **s.knobs()), 0)  # the same grid knobs
        assert all(torch.equal(plain.parts[k], ident.parts[k]) for k in plain.parts)
        assert all(torch.equal(plain.parts[k], rtn.parts[k]) for k in plain.parts)


def test_gptq_lowers_the_output_error_against_real_statistics():
    W, H = _problem()
    s = make_settings("gptq", b0=3)
    assert _out_err("gptq", get_method("gptq").compress(W, s, 0, InputStats(H)), W, H) < \
        _out_err("gptq", get_method("gptq").compress(W, s, 0), W, H)  # a regression check (GPTQ is greedy)


def test_qlr_rank_zero_is_its_gptq_backbone_and_never_worse_than_it():
    W, H = _problem()
    stats = InputStats(H)
    base = make_settings("qlr", b0=2, rank=RankPolicy("rank", 0))
    zero = get_method("qlr").compress(W, base, 0, stats)
    knobs = {k: v for k, v in base.knobs().items() if k != "rank"}
    gptq = get_method("gptq").compress(W, make_settings("gptq", **knobs), 0, stats)
    assert set(zero.parts) == set(gptq.parts) and all(torch.equal(zero.parts[k], gptq.parts[k]) for k in zero.parts)
    with_lr = get_method("qlr").compress(W, make_settings("qlr", b0=2, rank=RankPolicy("rank", 8)), 0, stats)
    assert _out_err("qlr", with_lr, W, H) <= _out_err("qlr", zero, W, H) + 1e-12  # the rank-0 iterate is a candidate


def test_qlr_backbone_updates_keep_the_first_backbones_grid():
    """The updates Q = GPTQ(W - L R) keep the first backbone's scales and zero points (no new grid search): whichever
    iterate is kept stores the grid of gptq(W) at b0, and an updated backbone (best iterate 2-4) is coded against it."""
    W, H = _problem(96, 128)
    stats = InputStats(H)
    kept = set()
    for b0, rank in ((2, 8), (2, 2), (4, 16)):
        s = make_settings("qlr", b0=b0, rank=RankPolicy("rank", rank), iters=2)
        res = get_method("qlr").compress(W, s, 0, stats)
        knobs = {k: v for k, v in s.knobs().items() if k not in ("rank", "iters", "b1", "b2")}
        first = get_method("gptq").compress(W, make_settings("gptq", **knobs), 0, stats)
        grid = [k for k in first.parts if not k.endswith("packed")]
        assert grid and all(torch.equal(res.parts[k], first.parts[k]) for k in grid)
        kept.add(res.info["best"])
    assert kept & {2, 3, 4}  # an updated backbone was kept at least once: the check above saw one


def test_calibrated_lsvd_with_float_factors_reaches_the_weighted_optimum():
    """With 32-bit factors nothing is quantized: the whitened SVD is the optimal rank-r factorization for H, whose
    squared relative error is the whitened spectrum's tail (Eckart-Young in the whitened space)."""
    W, H = _problem()
    r = 10
    s = make_settings("lsvd", b1=32, b2=32, rank=RankPolicy("rank", r))
    cal = get_method("lsvd").compress(W, s, 0, InputStats(H))
    plain = get_method("lsvd").compress(W, s, 0)
    sigma = whitened_singular_values(W, whitening(H)).double()
    optimum = float((sigma[r:].square().sum() / sigma.square().sum()).sqrt())
    assert abs(_out_err("lsvd", cal, W, H) - optimum) < 1e-5 * optimum + 1e-7  # float32 round-off
    assert _out_err("lsvd", cal, W, H) < _out_err("lsvd", plain, W, H)


def test_every_method_takes_statistics():
    W, H = _problem()
    for method in available_methods():
        s = make_settings(method, rank=RankPolicy("rank", 4)) if get_method(method).uses_rank else \
            make_settings(method)
        res = get_method(method).compress(W, s, 0, InputStats(H))
        assert get_method(method).decode(res.parts, res.info).shape == W.shape


def test_gptq_factor_shared_through_the_statistics_gives_the_same_bits():
    """q/k/v and a qlr's backbones share H: its GPTQ factorization is computed once (`InputStats.gptq_factor`)."""
    W, H = _problem()
    s = make_settings("gptq", b0=3, scheme="asymmetric", clip="mse")
    stats = InputStats(H)
    first = get_method("gptq").compress(W, s, 0, stats)
    assert [k for k in stats.cache if k[0] == "gptq_factor"]  # kept for the next weight with these inputs
    again = get_method("gptq").compress(W, s, 0, stats)  # from the kept factor
    fresh = get_method("gptq").compress(W, s, 0, InputStats(H.clone()))
    for res in (again, fresh):
        assert all(torch.equal(first.parts[k], res.parts[k]) for k in first.parts)


def test_a_budgets_backbone_is_reused_bit_for_bit_and_then_dropped():
    """The allocation pass's GPTQ backbone at the chosen width is qlr's first backbone: reused (taken from
    `BACKBONES`), the conversion stores exactly the bytes it stores when it computes it itself."""
    from lplr_convert.methods._common import BACKBONES

    W, H = _problem()
    q = get_method("qlr")
    s = make_settings("qlr", b0=3, rank=RankPolicy("rank", 4))
    BACKBONES.clear()
    alone = q.compress(W, s, 0, InputStats(H))
    assert not BACKBONES.entries
    cands = q.candidates(W, s, InputStats(H), 3.25, frozenset({"b0"}))
    assert {c.changes["b0"] for c in cands} == {3} and len(BACKBONES.entries) == 1
    calls = []
    real = BACKBONES.take
    BACKBONES.take = lambda key: calls.append(key) or real(key)
    try:
        reused = q.compress(W, s, 0, InputStats(H))
    finally:
        del BACKBONES.take
    assert len(calls) == 1 and not BACKBONES.entries  # taken, not kept
    assert set(alone.parts) == set(reused.parts)
    assert all(torch.equal(alone.parts[k], reused.parts[k]) for k in alone.parts)
    assert alone.info["history"] == reused.info["history"]
    # Another weight (or other statistics) never hits that entry.
    q.candidates(W, s, InputStats(H), 3.25, frozenset({"b0"}))
    other = q.compress(W * 2, s, 0, InputStats(H))
    assert len(BACKBONES.entries) == 1 and other.parts.keys() == alone.parts.keys()
    BACKBONES.clear()


def test_the_backbone_memo_keeps_at_most_its_limit():
    from lplr_convert.math import quantize as qz
    from lplr_convert.methods._common import BackboneMemo

    W = torch.randn(8, 32)
    q, _ = qz.quantize_dequantize_spec(W, qz.QuantSpec((8, 32), 4, "group", 0, 16, scheme="symmetric",
                                                       scale_dtype="float16"), torch.float32)
    size = sum(t.numel() * t.element_size() for t in qz.to_fields(q).values())
    memo = BackboneMemo(limit=size)
    memo.put("a", q)
    memo.put("b", q)  # over the limit: not kept (the conversion recomputes it)
    assert list(memo.entries) == ["a"] and memo.used == size
    assert memo.take("b") is None and memo.take("a") is q and memo.used == 0 and memo.take("a") is None
