"""LSVD: L = Q(U_r S_r) from a truncated SVD, then LPLR's least-squares refit and quantization of R."""

from __future__ import annotations

from ..math.error import frobenius_sq
from ..math.svd import truncated_svd
from ._common import FactoredMethod
from .base import register
from .lplr import refit


def energy_kept(Wf, s_top):
    """Fraction of sum(sigma^2) = ||W||_F^2 held by the kept singular values."""
    return (s_top.double().square().sum() / frobenius_sq(Wf)).clamp(max=1.0)


@register("lsvd")
class LSVD(FactoredMethod):
    def factors(self, Wf, r, s, seed):
        U, sv, _ = truncated_svd(Wf, r, s.svd, seed=seed)
        return refit(Wf, U * sv, r, s, energy_kept(Wf, sv))
