"""DSVD (the paper's baseline): L = Q(U_r), R = Q(S_r V_r^T), no refit."""

from __future__ import annotations

from dataclasses import dataclass

from ..math import quantize as qz
from ..math.svd import energy_kept, truncated_svd
from ._common import FactoredMethod, FactoredSettings, Factors, factor_specs
from .base import register
from .settings import SvdKnobs


@dataclass(frozen=True)
class DSVDSettings(FactoredSettings, SvdKnobs):
    """Factor bits, quantizer and rank policy, plus the truncated SVD route (no calibration: no GPTQ knobs)."""


@register("dsvd")
class DSVD(FactoredMethod):
    settings_cls = DSVDSettings

    def factors(self, Wf, r, s, seed):
        m, n = Wf.shape
        U, sv, Vh = truncated_svd(Wf, r, s.svd, seed=seed)
        left, right = factor_specs(m, n, r, s)
        qL, L = qz.quantize_dequantize_spec(U, left, Wf.dtype)
        qR, R = qz.quantize_dequantize_spec(sv[:, None] * Vh, right, Wf.dtype)
        return Factors(qL, qR, L, R, energy=energy_kept(Wf, sv), sv=sv)
