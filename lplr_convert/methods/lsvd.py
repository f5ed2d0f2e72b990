"""LSVD: L = Q(U_r S_r) from a truncated SVD, then LPLR's least-squares refit and quantization of R.

With calibration statistics the SVD is that of the whitened W S (H = S S^T: truncation-aware, SVD-LLM) and the
factors are quantized by GPTQ against their own inputs (`_common.calibrated_factors`); without them it is the
published method.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..math.svd import energy_kept, truncated_svd
from ._common import CalibratedFactoredSettings, FactoredMethod, quantize_left, refit
from .base import register
from .settings import SvdKnobs


@dataclass(frozen=True)
class LSVDSettings(CalibratedFactoredSettings, SvdKnobs):
    """Factor bits, quantizer, rank policy and GPTQ knobs (with calibration), plus the truncated SVD route."""


@register("lsvd")
class LSVD(FactoredMethod):
    settings_cls = LSVDSettings
    uses_stats = True

    def factors(self, Wf, r, s, seed):
        U, sv, Vh = truncated_svd(Wf, r, s.svd, seed=seed)
        del Vh  # the refit replaces it
        energy = energy_kept(Wf, sv)
        qL, L = quantize_left(Wf, U.mul_(sv), r, s)  # U S in place: U is ours
        del U
        return refit(Wf, qL, L, r, s, energy, sv)
