"""Random sketches, regenerated from a stored seed on the compute device: Gaussian N(0, 1/r) or a sparse sign (JL) sketch."""

from __future__ import annotations

import hashlib
import math

import torch

SKETCHES = ("gaussian", "sparse")
# Arithmetic of the product W S: "auto" takes bfloat16 where the device multiplies it natively (`native_bfloat16`).
SKETCH_PRECISIONS = ("auto", "float32", "bfloat16")

__all__ = ["SKETCHES", "SKETCH_PRECISIONS", "derive_seed", "native_bfloat16", "sketch_matrix", "sketch_product"]


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


def native_bfloat16(device: torch.device | str) -> bool:
    """The device multiplies bfloat16 matrices in hardware: a CUDA device that supports bfloat16, or a CPU with
    AVX512-BF16 or AMX (elsewhere a bfloat16 product can be far slower than a float32 one)."""
    device = torch.device(device)
    if device.type == "cuda":  # not counting emulation (a pre-Ampere GPU's bfloat16 is slower than its float32)
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    if device.type == "cpu":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(bool(getattr(torch.cpu, p, lambda: False)()) for p in probes)
    return False


def sketch_product(W: torch.Tensor, S: torch.Tensor, precision: str = "float32") -> tuple[torch.Tensor, str]:
    """(W S in W's dtype, the dtype it was formed in: W's own, or "bfloat16").

    "bfloat16" rounds W, S and the product to bfloat16 (8 significant bits; the GEMM sums in float32): a relative
    perturbation of about 2**-8 of each entry of W S, which LPLR then quantizes to b1 bits. At b1 <= 8 that is below
    a step of the quantizer. Measured with three seeds on an 11008 x 4096 matrix (8-bit factors, f = 0.8) and three
    all-MiniLM-L6-v2 weights (8 bits f = 0.8, 4 bits f = 0.5): the relative errors moved by at most 0.0006 (0.15 %
    of the error; mostly 1e-5). On a 120 x 80 Gaussian matrix at 4 bits, rank 30, 20 seeds: the change has mean
    -3e-5 (no bias) and standard deviation 0.0006, against 0.0043 between seeds. The product runs at about 4x the
    float32 rate on a CPU with AVX512-BF16 (1.53 s -> 0.38 s for 11008 x 4096 by 4096 x 3277 here). "auto" takes bfloat16 for a float32 W when `native_bfloat16(W.device)`,
    and W's own precision otherwise ("float32" means W's own precision, float64 for a float64 W).
    """
    if precision not in SKETCH_PRECISIONS:
        raise ValueError(f"sketch precision {precision!r} is unknown; use one of {', '.join(SKETCH_PRECISIONS)}")
    if precision == "auto":
        fast = W.dtype == torch.float32 and native_bfloat16(W.device)
        precision = "bfloat16" if fast else "float32"
    if precision == "float32":
        return W @ S.to(W.dtype), str(W.dtype).removeprefix("torch.")
    Y = W.to(torch.bfloat16) @ S.to(torch.bfloat16)  # the bfloat16 copies of W and S are freed here
    return Y.to(W.dtype), "bfloat16"
