"""LASER (Sharma, Ash, Misra 2024): replace W by its dense rank-k reconstruction U_k S_k V_k^T (no quantization)."""

from __future__ import annotations

from dataclasses import dataclass

from ..dtypes import dtype_bits, dtype_name
from ..math.error import relative_error
from ..math.svd import energy_kept, singular_values, truncated_svd
from ._common import float_matrix
from .base import Method, MethodResult, register
from .settings import RankKnobs, SvdKnobs, resolve_rank


@dataclass(frozen=True)
class LASERSettings(RankKnobs, SvdKnobs):
    pass


@register("laser")
class LASER(Method):
    settings_cls = LASERSettings
    parts = ("",)

    def compress(self, W, settings, seed, stats=None):
        Wf = float_matrix(W, self.name)
        m, n = Wf.shape
        k = resolve_rank(settings.rank, m, n, singular_values=lambda: singular_values(Wf))
        U, sv, Vh = truncated_svd(Wf, k, settings.svd, seed=seed)
        stored = ((U * sv) @ Vh).to(W.dtype)
        err = relative_error(Wf, stored)
        return MethodResult({"": stored}, {"rank": k, "dtype": dtype_name(W.dtype)},
                            stored.numel() * dtype_bits(W.dtype), err, k, energy_kept(Wf, sv), spectrum=sv)

    def decode(self, parts, info):
        return parts[""].float()

    def predict(self, shape, dtype, settings, calibrated=False):
        m, n = shape
        k = None if settings.rank.needs_spectrum else resolve_rank(settings.rank, m, n)
        return k, {"": (dtype_name(dtype), tuple(shape))}
