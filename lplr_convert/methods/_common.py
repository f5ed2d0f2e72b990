"""Helpers shared by the methods: stored quantized parts, the factored-method skeleton, and the quantize-then-refit
step that LPLR and LSVD share."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import constants as C
from ..dtypes import dtype_name
from ..errors import LplrError
from ..math import quantize as qz
from ..math.error import factor_relative_error
from ..math.lstsq import solve_normal
from ..math.svd import singular_values
from .base import Method, MethodResult
from .settings import FactorBits, QuantKnobs, RankKnobs, Settings, SvdKnobs, resolve_rank

__all__ = ["FactoredMethod", "FactoredSettings", "Factors", "SvdFactoredSettings", "decode_quant", "factor_bits", "factor_specs",
           "float_matrix", "predict_quant", "quant_parts", "quantize_left", "refit"]


def float_matrix(W: torch.Tensor, method: str) -> torch.Tensor:
    """W as a float32/float64 matrix; a tensor that is not a non-empty 2-D float matrix is an LplrError."""
    if W.dim() != 2 or W.numel() == 0:
        raise LplrError(f"method {method!r} needs a non-empty 2-D weight matrix, got shape {tuple(W.shape)}; "
                        f"leave such tensors to 'copy' (exclude them from compression)")
    if not W.dtype.is_floating_point:
        raise LplrError(f"method {method!r} needs a floating-point weight, got {dtype_name(W.dtype)}; "
                        f"leave such tensors to 'copy'")
    return W if W.dtype in (torch.float32, torch.float64) else W.float()


def part_name(part: str, field: str) -> str:
    """Suffix of a stored tensor: "<part>.<field>", or "<part>" for a float matrix."""
    return f"{part}.{field}" if field else part


def quant_parts(part: str, q: qz.Quantized) -> dict[str, torch.Tensor]:
    return {part_name(part, f): t for f, t in qz.to_fields(q).items()}


def parts_of(part: str, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The fields of one quantized part, keyed by field name."""
    out = {}
    for suffix, t in parts.items():
        if suffix == part:
            out[""] = t
        elif suffix.startswith(part + "."):
            out[suffix[len(part) + 1:]] = t
    return out


def decode_quant(part: str, parts: dict[str, torch.Tensor], spec_json: dict) -> torch.Tensor:
    spec = qz.QuantSpec.from_json(spec_json)
    return qz.dequantize(qz.from_fields(parts_of(part, parts), spec))


def predict_quant(part: str, spec: qz.QuantSpec) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {part_name(part, f): v for f, v in qz.field_specs(spec).items()}


@dataclass(frozen=True)
class FactoredSettings(FactorBits, QuantKnobs, RankKnobs):
    """Knobs every factored method has: factor bits, the quantizer, the rank policy."""


@dataclass(frozen=True)
class SvdFactoredSettings(FactoredSettings, SvdKnobs):
    """Factored methods that start from a truncated SVD (lsvd, dsvd)."""


def factor_specs(m: int, n: int, r: int, s: Settings) -> tuple[qz.QuantSpec, qz.QuantSpec]:
    """Left factor (m x r, one scale per column) and right factor (r x n, one scale per row)."""
    left = qz.QuantSpec((m, r), s.b1, s.quantizer, 1, s.group_size)
    right = qz.QuantSpec((r, n), s.b2, s.quantizer, 0, s.group_size)
    return left, right


def factor_bits(m: int, n: int, r: int, s: Settings) -> int:
    left, right = factor_specs(m, n, r, s)
    return qz.stored_bits(left) + qz.stored_bits(right)


@dataclass
class Factors:
    """What `FactoredMethod.factors` produces: the stored factors, their dequantized values (exactly what a loader
    reconstructs), the least-squares products the error can reuse (see `factor_relative_error`), the spectrum
    energy kept and the singular values the factorization computed (if known)."""

    qL: qz.Quantized
    qR: qz.Quantized
    L: torch.Tensor
    R: torch.Tensor
    gram: torch.Tensor | None = None
    cross: torch.Tensor | None = None
    chol: torch.Tensor | None = None
    energy: torch.Tensor | None = None
    sv: torch.Tensor | None = None


def quantize_left(Wf: torch.Tensor, Y: torch.Tensor, r: int, s: Settings) -> tuple[qz.Quantized, torch.Tensor]:
    """The stored left factor Q(Y) and its dequantized value. Callers drop Y right after (it is m x r, like L)."""
    left, _ = factor_specs(*Wf.shape, r, s)
    return qz.quantize_dequantize(Y, s.b1, left.granularity, left.channel_dim, left.group_size, Wf.dtype)


def refit(Wf: torch.Tensor, qL: qz.Quantized, L: torch.Tensor, r: int, s: Settings, energy=None,
          sv=None) -> Factors:
    """Solve for R in least squares against the quantized left factor, quantize R (LPLR's and LSVD's second half)."""
    _, right = factor_specs(*Wf.shape, r, s)
    sol = solve_normal(L, Wf)
    qR, R = qz.quantize_dequantize(sol.R, s.b2, right.granularity, right.channel_dim, right.group_size, Wf.dtype)
    # The unquantized R is dropped with `sol` here, before the error's temporaries.
    return Factors(qL, qR, L, R, sol.gram, sol.cross, sol.chol, energy, sv)


class FactoredMethod(Method):
    """W ~ L R with L (m x r) and R (r x n) stored quantized. Subclasses implement `factors`."""

    factored = True
    settings_cls = FactoredSettings
    parts = (C.PART_LEFT, C.PART_RIGHT)

    def rank_for(self, W: torch.Tensor, s: Settings) -> int:
        m, n = W.shape
        return resolve_rank(s.rank, m, n, bits_for_rank=lambda r: factor_bits(m, n, r, s),
                            singular_values=lambda: singular_values(W))

    def factors(self, W: torch.Tensor, r: int, s: Settings, seed: int) -> Factors:
        """The rank-r factors of float W."""
        raise NotImplementedError

    def compress(self, W: torch.Tensor, settings: Settings, seed: int) -> MethodResult:
        Wf = float_matrix(W, self.name)
        r = self.rank_for(Wf, settings)
        f = self.factors(Wf, r, settings, seed)
        err = factor_relative_error(Wf, f.L, f.R, gram=f.gram, cross=f.cross, chol=f.chol)
        parts = {**quant_parts(C.PART_LEFT, f.qL), **quant_parts(C.PART_RIGHT, f.qR)}
        info = {"rank": r, "left": f.qL.spec.to_json(), "right": f.qR.spec.to_json()}
        bits = qz.stored_bits(f.qL.spec) + qz.stored_bits(f.qR.spec)
        return MethodResult(parts, info, bits, err, r, f.energy, spectrum=f.sv)

    def decode_factors(self, parts: dict[str, torch.Tensor], info: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return (decode_quant(C.PART_LEFT, parts, info["left"]), decode_quant(C.PART_RIGHT, parts, info["right"]))

    def decode(self, parts: dict[str, torch.Tensor], info: dict) -> torch.Tensor:
        L, R = self.decode_factors(parts, info)
        return L @ R

    def predict(self, shape, dtype, settings):
        m, n = shape
        if settings.rank.needs_spectrum:
            return None, {}
        r = resolve_rank(settings.rank, m, n, bits_for_rank=lambda k: factor_bits(m, n, k, settings))
        left, right = factor_specs(m, n, r, settings)
        return r, {**predict_quant(C.PART_LEFT, left), **predict_quant(C.PART_RIGHT, right)}
