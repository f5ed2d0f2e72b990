"""The dense product L R (+ base) of factors, formed one block of rows at a time on one fixed schedule.

Every dense reconstruction of a factored weight (the loaders, decompress, export, `LowRankLinear.to_dense`) and the
conversion's measurement of what they return go through `product_rows`, so they compute each block with the very
same matrix product and agree bit for bit on any device: a BLAS may round the rows of a product differently from the
product of those rows (one-row products take another kernel here). The blocks also bound the temporaries of a
caller that reduces them one at a time (32 MiB of float32 each: 2048 rows of 4096 columns, which multiply at the full
rate of one whole product here, where 512-row blocks lost 10 %).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

__all__ = ["product", "product_rows"]

_BLOCK_ELEMENTS = 1 << 23


def _step(n: int) -> int:
    return max(1, _BLOCK_ELEMENTS // max(1, n))


def product_rows(L: torch.Tensor, R: torch.Tensor, base: torch.Tensor | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, base[i:j] + L[i:j] @ R) for consecutive row blocks of the fixed schedule (base optional)."""
    step = _step(R.shape[1])
    for i in range(0, L.shape[0], step):
        block = L[i:i + step] @ R
        yield i, block if base is None else base[i:i + step] + block


def product(L: torch.Tensor, R: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
    """base + L @ R (m x n) assembled from `product_rows`."""
    dtype = torch.promote_types(L.dtype, R.dtype) if base is None else \
        torch.promote_types(torch.promote_types(L.dtype, R.dtype), base.dtype)
    out = torch.empty(L.shape[0], R.shape[1], dtype=dtype, device=L.device)
    for i, block in product_rows(L, R, base):
        out[i:i + block.shape[0]] = block
    return out
