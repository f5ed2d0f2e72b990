"""LSVD: L = Q(U_r S_r) from a truncated SVD, then LPLR's least-squares refit and quantization of R."""

from __future__ import annotations

from ..math.svd import energy_kept, truncated_svd
from ._common import FactoredMethod, SvdFactoredSettings, quantize_left, refit
from .base import register


@register("lsvd")
class LSVD(FactoredMethod):
    settings_cls = SvdFactoredSettings

    def factors(self, Wf, r, s, seed):
        U, sv, Vh = truncated_svd(Wf, r, s.svd, seed=seed)
        del Vh  # the refit replaces it
        energy = energy_kept(Wf, sv)
        qL, L = quantize_left(Wf, U.mul_(sv), r, s)  # U S in place: U is ours
        del U
        return refit(Wf, qL, L, r, s, energy, sv)
