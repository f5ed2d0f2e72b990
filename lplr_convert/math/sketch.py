"""Random sketches, regenerated from a stored seed on the compute device: Gaussian N(0, 1/r) or a sparse sign (JL) sketch."""

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

    Drawn on `device` itself from a generator seeded with `seed`, so no sketch crosses the host-device link. The
    same seed gives the same sketch on every CPU; an accelerator's generator draws other numbers from the same
    distribution (its outputs differ from a CPU run's in any case, as its GEMMs round differently). A device without a
    seedable generator gets the CPU's sketch, copied.
    `gaussian`: entries N(0, 1/r). `sparse`: each row has min(nnz_per_row, r) entries of +-1/sqrt(nnz) in random
    columns (a sparse Johnson-Lindenstrauss sketch).
    """
    if kind not in SKETCHES:
        raise ValueError(f"sketch {kind!r} is unknown; use one of {', '.join(SKETCHES)}")
    device = torch.device(device)
    try:
        gen = torch.Generator(device=device).manual_seed(int(seed))
    except RuntimeError:  # no generator on this device type: draw on the CPU
        return sketch_matrix(n, r, seed, kind, dtype, "cpu", nnz_per_row).to(device)
    if kind == "gaussian":
        s = torch.randn(n, r, generator=gen, dtype=torch.float32, device=device).div_(math.sqrt(r))
    else:
        s_nnz = min(nnz_per_row, r)
        cols = torch.rand(n, r, generator=gen, device=device).argsort(dim=1)[:, :s_nnz]
        signs = torch.randint(0, 2, (n, s_nnz), generator=gen, dtype=torch.int8, device=device).float() * 2 - 1
        s = torch.zeros(n, r, dtype=torch.float32, device=device)
        s.scatter_(1, cols, signs / math.sqrt(s_nnz))
    return s.to(dtype=dtype)
