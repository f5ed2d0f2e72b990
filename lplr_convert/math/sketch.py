"""Random sketches, regenerated from a stored seed: Gaussian N(0, 1/r) or a sparse sign (JL) sketch."""

from __future__ import annotations

import hashlib
import math

import torch

SKETCHES = ("gaussian", "sparse")

__all__ = ["SKETCHES", "derive_seed", "sketch_matrix"]


def derive_seed(global_seed: int, name: str) -> int:
    """A per-tensor seed from the global seed and the tensor's name (stable across runs and machines)."""
    digest = hashlib.sha256(f"{int(global_seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sketch_matrix(n: int, r: int, seed: int, kind: str = "gaussian", dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu", nnz_per_row: int = 8) -> torch.Tensor:
    """An n x r sketch S with E[S S^T] = I.

    Drawn on the CPU from a seeded generator and then moved, so the same seed gives the same sketch on any device.
    `gaussian`: entries N(0, 1/r). `sparse`: each row has min(nnz_per_row, r) entries of +-1/sqrt(nnz) in random
    columns (a sparse Johnson-Lindenstrauss sketch).
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    if kind == "gaussian":
        s = torch.randn(n, r, generator=gen, dtype=torch.float32) / math.sqrt(r)
    elif kind == "sparse":
        s_nnz = min(nnz_per_row, r)
        cols = torch.rand(n, r, generator=gen).argsort(dim=1)[:, :s_nnz]
        signs = torch.randint(0, 2, (n, s_nnz), generator=gen, dtype=torch.int8).float() * 2 - 1
        s = torch.zeros(n, r, dtype=torch.float32)
        s.scatter_(1, cols, signs / math.sqrt(s_nnz))
    else:
        raise ValueError(f"sketch {kind!r} is unknown; use one of {', '.join(SKETCHES)}")
    return s.to(device=device, dtype=dtype)
