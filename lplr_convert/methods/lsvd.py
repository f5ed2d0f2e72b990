"""LSVD: L = Q(U_r S_r) from a truncated SVD, then LPLR's least-squares refit and quantization of R."""

from __future__ import annotations

from ..math.error import frobenius_sq
from ..math.svd import truncated_svd
from ._common import FactoredMethod
from .base import register
from .lplr import quantize_left, refit


def energy_kept(Wf, s_top):
    """Fraction of sum(sigma^2) = ||W||_F^2 held by the kept singular values."""
    return (s_top.double().square().sum() / frobenius_sq(Wf)).clamp(max=1.0)


@register("lsvd")
class LSVD(FactoredMethod):
    def factors(self, Wf, r, s, seed):
        U, sv, Vh = truncated_svd(Wf, r, s.svd, seed=seed)
        del Vh  # the refit replaces it
        energy = energy_kept(Wf, sv)
        qL, L = quantize_left(Wf, U.mul_(sv), r, s)  # U S in place: U is ours
        del U
        return refit(Wf, qL, L, r, s, energy)
