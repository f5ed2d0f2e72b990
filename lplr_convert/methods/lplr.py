"""LPLR (Saha, Srivastava, Pilanci 2023): sketch, quantize, least-squares refit, quantize."""

from __future__ import annotations

import torch

from ..math import quantize as qz
from ..math.lstsq import solve_normal
from ..math.sketch import sketch_matrix
from ._common import FactoredMethod, Factors, factor_specs
from .base import register


def refit(Wf: torch.Tensor, Y: torch.Tensor, r: int, s, energy=None) -> Factors:
    """Quantize the left factor Y, solve for R in least squares, quantize R (shared by LPLR and LSVD)."""
    m, n = Wf.shape
    left, right = factor_specs(m, n, r, s)
    qL, L = qz.quantize_dequantize(Y, s.b1, left.granularity, left.channel_dim, left.group_size, Wf.dtype)
    del Y
    sol = solve_normal(L, Wf)
    qR, R = qz.quantize_dequantize(sol.R, s.b2, right.granularity, right.channel_dim, right.group_size, Wf.dtype)
    sol.R = None  # the unquantized solution is not needed any more: free it before the error's temporaries
    return Factors(qL, qR, L, R, sol, energy)


@register("lplr")
class LPLR(FactoredMethod):
    def factors(self, Wf, r, s, seed):
        S = sketch_matrix(Wf.shape[1], r, seed, s.sketch, dtype=Wf.dtype, device=Wf.device)
        # Row-major Y keeps L and its codes row-major, so packing needs no transposing copy: 3.0-3.2 s against
        # 3.2-3.4 s for (S^T W^T)^T on 11008x4096, f=0.8 (the GEMMs alone run equally fast; AVX-512 machine).
        Y = Wf @ S
        del S
        for _ in range(s.power_iters):  # subspace iteration: span(Y) <- span(W W^T Y), kept orthonormal
            # Without re-orthonormalising, every column converges to the top singular vector and the quantized L
            # becomes nearly rank one (measured: error 0.35 instead of 0.27 after 2 iterations on a 120 x 90 test).
            Y, _ = torch.linalg.qr(Wf @ (Wf.T @ Y))
        return refit(Wf, Y, r, s)
