"""The dense product of factors on its fixed row-block schedule."""

from __future__ import annotations

import torch

from lplr_convert.math.lowrank import product, product_rows


def test_product_is_base_plus_l_r_block_by_block():
    gen = torch.Generator().manual_seed(0)
    L, R = torch.randn(9000, 5, generator=gen), torch.randn(5, 1024, generator=gen)
    base = torch.randn(9000, 1024, generator=gen)
    blocks = list(product_rows(L, R, base))
    assert [i for i, _ in blocks] == [0, 8192] and sum(b.shape[0] for _, b in blocks) == 9000
    got = product(L, R, base)
    assert torch.equal(got, torch.cat([b for _, b in blocks]))
    torch.testing.assert_close(got, base + L @ R, rtol=1e-5, atol=1e-5)
    assert torch.equal(product(L, R), torch.cat([b for _, b in product_rows(L, R)]))
    assert product(L.half(), R.half()).dtype == torch.float16
    empty = product(torch.zeros(4, 0), torch.zeros(0, 3), torch.ones(4, 3))  # rank 0: the base alone
    assert torch.equal(empty, torch.ones(4, 3))
