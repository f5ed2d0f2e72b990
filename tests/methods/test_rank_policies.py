"""Rank policies: the published meanings (ceil for rank fractions, int for LASER's rho), budgets and refusals."""

from __future__ import annotations

import pytest
import torch

from lplr_convert.errors import LplrError
from lplr_convert.methods import RankPolicy, get_method, make_settings, resolve_rank
from lplr_convert.methods._common import factor_bits


def test_rank_fraction_rounds_up():
    assert resolve_rank(RankPolicy("rank_fraction", 0.8), 384, 1536) == 308  # ceil(307.2)
    assert resolve_rank(RankPolicy("rank_fraction", 0.5), 384, 384) == 192
    assert resolve_rank(RankPolicy("rank_fraction", 0.3), 10, 20) == 3  # 0.3 * 10 = 3.0000000000000004 in floats
    assert resolve_rank(RankPolicy("rank_fraction", 0.001), 10, 20) == 1
    assert resolve_rank(RankPolicy("rank_fraction", 1.0), 64, 32) == 32


def test_rho_truncates_and_rate_maps_to_rho():
    assert resolve_rank(RankPolicy("rho", 0.8), 384, 1536) == 307  # int(307.2)
    assert resolve_rank(RankPolicy("rho", 0.29), 100, 100) == 29  # 0.29 * 100 = 28.999999999999996 in floats
    assert resolve_rank(RankPolicy("rate", 9.9), 384, 1536) == 3  # rho = 1 - 0.99 = 0.01; int(3.84)
    assert resolve_rank(RankPolicy("rate", 5), 384, 1536) == 192
    assert resolve_rank(RankPolicy("rate", 0), 384, 1536) == 384


def test_rank_is_taken_as_given():
    assert resolve_rank(RankPolicy("rank", 17), 40, 30) == 17
    assert resolve_rank(RankPolicy("rank", 30), 40, 30) == 30


def test_energy_keeps_the_fewest_components_reaching_p():
    sv = torch.tensor([4.0, 3.0, 2.0, 1.0]).sqrt()  # energies 0.4, 0.3, 0.2, 0.1
    get = lambda: sv
    assert resolve_rank(RankPolicy("energy", 0.7), 4, 4, singular_values=get) == 2  # exactly 0.7 is enough
    assert resolve_rank(RankPolicy("energy", 0.71), 4, 4, singular_values=get) == 3
    assert resolve_rank(RankPolicy("energy", 0.4), 4, 4, singular_values=get) == 1
    assert resolve_rank(RankPolicy("energy", 1.0), 4, 4, singular_values=get) == 4


def test_energy_through_a_method():
    W = torch.randn(60, 40, generator=torch.Generator().manual_seed(0)) * torch.logspace(0, -2, 40)
    s = make_settings(method="lsvd", rank=RankPolicy("energy", 0.9))
    res = get_method("lsvd").compress(W, s, 0)
    sigma2 = torch.linalg.svdvals(W.double()).square()
    cum = torch.cumsum(sigma2, 0) / sigma2.sum()
    r = res.rank
    assert float(cum[r - 1]) >= 0.9 > float(cum[r - 2])
    assert float(res.energy_kept) == pytest.approx(float(cum[r - 1]), rel=1e-6)


def test_bits_per_param_counts_scales():
    """64 x 64, 8-bit channel factors: rank r costs 1024 r code bits + 128 r scale/zero bits. A 2 bits/param budget
    (8192 bits) fits r = 7 (8064 bits); counting codes only would wrongly allow r = 8."""
    s = make_settings(method="lplr", scheme="minmax", rank=RankPolicy("bits_per_param", 2.0))
    assert factor_bits(64, 64, 7, s) == 7 * 1152
    assert resolve_rank(s.rank, 64, 64, bits_for_rank=lambda r: factor_bits(64, 64, r, s)) == 7
    res = get_method("lplr").compress(torch.randn(64, 64), s, 0)
    assert res.rank == 7 and res.stored_bits == 8064 <= 2.0 * 64 * 64
    assert factor_bits(64, 64, 8, s) > 2.0 * 64 * 64


@pytest.mark.parametrize("quantizer,group_size", [("tensor", None), ("channel", None), ("group", 16)])
@pytest.mark.parametrize("budget", [1.0, 3.3, 8.0])
def test_bits_per_param_picks_the_largest_fitting_rank(quantizer, group_size, budget):
    m, n = 96, 80
    s = make_settings(method="lsvd", b1=4, b2=6, quantizer=quantizer, group_size=group_size,
                       rank=RankPolicy("bits_per_param", budget))
    r = resolve_rank(s.rank, m, n, bits_for_rank=lambda k: factor_bits(m, n, k, s))
    assert factor_bits(m, n, r, s) <= budget * m * n
    assert r == min(m, n) or factor_bits(m, n, r + 1, s) > budget * m * n
    W = torch.randn(m, n, generator=torch.Generator().manual_seed(0))
    res = get_method("lsvd").compress(W, s, 0)
    assert res.rank == r and res.stored_bits == factor_bits(m, n, r, s)


def test_bits_per_param_too_small_is_a_clear_error():
    s = make_settings(method="lplr", rank=RankPolicy("bits_per_param", 0.01))
    with pytest.raises(LplrError, match="even rank 1 needs"):
        get_method("lplr").compress(torch.randn(64, 64), s, 0)


@pytest.mark.parametrize("policy", [RankPolicy("rank", 31), RankPolicy("rho", 0.01), RankPolicy("rate", 9.99)])
def test_rank_outside_the_matrix_is_a_clear_error(policy):
    with pytest.raises(LplrError, match=r"outside 1\.\.30"):
        resolve_rank(policy, 40, 30)


@pytest.mark.parametrize("kind,value", [("rank_fraction", 0), ("rank_fraction", 1.5), ("rho", -0.1), ("energy", 2),
                                        ("rank", -1), ("rank", 2.5), ("bits_per_param", 0), ("rate", 10),
                                        ("rank_fraction", float("nan")), ("rank", True)])
def test_bad_policy_values_are_refused(kind, value):
    with pytest.raises(LplrError, match=kind):
        RankPolicy(kind, value)


def test_unknown_policy_lists_the_known_ones():
    with pytest.raises(LplrError, match="rank_fraction, rank, bits_per_param, energy, rho, rate"):
        RankPolicy("fraction", 0.5)


def test_bits_per_param_does_not_apply_to_laser():
    s = make_settings(method="laser", rank=RankPolicy("bits_per_param", 4.0))
    with pytest.raises(LplrError, match="bits_per_param only applies"):
        get_method("laser").compress(torch.randn(8, 8), s, 0)
    with pytest.raises(LplrError, match="bits_per_param only applies"):
        get_method("laser").predict((8, 8), torch.float32, s)


@pytest.mark.parametrize("method", ["lplr", "lsvd", "dsvd", "laser", "rtn"])
@pytest.mark.parametrize("shape", [(16,), (2, 3, 4), (0, 5)], ids=str)
def test_non_matrix_input_is_a_clear_error(method, shape):
    with pytest.raises(LplrError, match="2-D weight matrix"):
        get_method(method).compress(torch.ones(shape), make_settings(method=method), 0)


def test_integer_input_is_a_clear_error():
    with pytest.raises(LplrError, match="floating-point"):
        get_method("lplr").compress(torch.ones(8, 8, dtype=torch.int64), make_settings(), 0)


def test_rank_zero_only_where_a_backbone_carries_the_weight():
    """Rank 0 is a valid policy (qlr: the backbone alone) but no factored method without a backbone may keep it."""
    with pytest.raises(LplrError, match=r"outside 1\.\.30"):
        resolve_rank(RankPolicy("rank", 0), 40, 30)
    assert resolve_rank(RankPolicy("rank", 0), 40, 30, min_rank=0) == 0

