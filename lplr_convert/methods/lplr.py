"""LPLR (Saha, Srivastava, Pilanci 2023): sketch, quantize, least-squares refit, quantize.

With calibration statistics the sketch is taken in the whitened space (W S Omega, H = S S^T) and the factors are
quantized by GPTQ against their own inputs (`_common.calibrated_factors`); without them it is the published method.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..math.sketch import SKETCH_PRECISIONS, SKETCHES, sketch_matrix, sketch_product
from ..math.whiten import whitened_sketch_basis
from ._common import CalibratedFactoredSettings, FactoredMethod, quantize_left, refit
from .base import register
from .settings import MAX_ITERATIONS, iteration_count, knob


@dataclass(frozen=True)
class LPLRSettings(CalibratedFactoredSettings):
    sketch: str = knob("gaussian", type=str, choices=SKETCHES, label="nondefault", help="LPLR sketch.")
    power_iters: int = knob(0, type=int, validate=iteration_count(0), label="nondefault",
                            help=f"LPLR power iterations (0-{MAX_ITERATIONS}).")
    sketch_precision: str = knob(
        "auto", type=str, choices=SKETCH_PRECISIONS, label="nondefault",
        help="Arithmetic of LPLR's sketch product W S (without calibration), which is quantized to b1 bits next: "
             "auto takes bfloat16 when "
             "b1 <= 8 and the device multiplies bfloat16 natively (about 4x faster on such a CPU; the error moves "
             "less than between seeds), float32 otherwise. The tensor record's sketch_precision says which was used.")


@register("lplr")
class LPLR(FactoredMethod):
    settings_cls = LPLRSettings
    uses_stats = True
    record_fields = ("sketch_precision",)

    def calibrated_basis(self, Wf, r, s, seed, stats):
        return whitened_sketch_basis(Wf, stats.whitening(), r, seed, s.sketch, s.power_iters)

    def factors(self, Wf, r, s, seed):
        S = sketch_matrix(Wf.shape[1], r, seed, s.sketch, device=Wf.device)
        # Row-major Y keeps L and its codes row-major, so packing needs no transposing copy: 3.0-3.2 s against
        # 3.2-3.4 s for (S^T W^T)^T on 11008x4096, f=0.8 (the GEMMs alone run equally fast; AVX-512 machine).
        precision = "float32" if s.sketch_precision == "auto" and s.b1 > 8 else s.sketch_precision
        Y, used = sketch_product(Wf, S, precision)
        del S
        for _ in range(s.power_iters):  # subspace iteration: span(Y) <- span(W W^T Y), kept orthonormal
            # Without re-orthonormalising, every column converges to the top singular vector and the quantized L
            # becomes nearly rank one (measured: error 0.35 instead of 0.27 after 2 iterations on a 120 x 90 test).
            Y, _ = torch.linalg.qr(Wf @ (Wf.T @ Y))
        qL, L = quantize_left(Wf, Y, r, s)
        del Y  # not alive during the solve: 0.8x the matrix in fp32 at f = 0.8
        f = refit(Wf, qL, L, r, s)
        f.extra["sketch_precision"] = used
        return f
