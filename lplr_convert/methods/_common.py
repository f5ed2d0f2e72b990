"""Helpers shared by the methods: stored quantized parts, the factored-method skeleton, and the quantize-then-refit
step that LPLR and LSVD share."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .. import constants as C
from ..dtypes import dtype_name
from ..errors import LplrError
from ..math import quantize as qz
from ..math.error import factor_relative_error, relative_error
from ..math.gptq import gptq
from ..math.hadamard import Incoherence
from ..math.lowrank import product
from ..math.lstsq import solve_normal
from ..math.qlr import fit_low_rank
from ..math.svd import singular_values
from .base import Candidate, InputStats, Method, MethodResult, PackedLayout, QuantPart, incoherence_of
from .settings import (
    FactorBits,
    GPTQKnobs,
    QuantKnobs,
    RankKnobs,
    RankPolicy,
    Settings,
    resolve_rank,
)

CALIBRATED_REFITS = 2  # rounds of the quantized refit with calibration (the better one is kept)

__all__ = ["BACKBONES", "BackboneMemo", "CalibratedFactoredSettings", "DirectQuantMethod", "FactoredMethod", "FactoredSettings", "Factors",
           "decode_quant", "factor_bits",
           "factor_specs", "float_matrix", "incoherent", "predict_quant", "quant_parts", "quant_spec", "quantize_left", "rank_grid", "refit", "whitened_tails"]


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


def decode_quant(part: str, parts: dict[str, torch.Tensor], spec_json: dict) -> torch.Tensor:
    return QuantPart.of(part, spec_json).dequantized(parts)


def predict_quant(part: str, spec: qz.QuantSpec) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {part_name(part, f): v for f, v in qz.field_specs(spec).items()}


@dataclass(frozen=True)
class FactoredSettings(FactorBits, QuantKnobs, RankKnobs):
    """Knobs every factored method has: factor bits, the quantizer, the rank policy."""


@dataclass(frozen=True)
class CalibratedFactoredSettings(FactoredSettings, GPTQKnobs):
    """Factored methods that become activation-aware with calibration (whitened basis, GPTQ-quantized factors)."""


def gptq_quantizer(spec_of, s: Settings, stats: InputStats | None = None):
    """A `math.qlr.Quantizer`: (M, H_M) -> (Quantized, dequantized M), GPTQ against H_M with the spec
    `spec_of(M.shape)` and the GPTQ knobs of `s` (round-to-nearest, exactly GPTQ with H = I, when H_M is None).
    When H_M is `stats.H` itself, GPTQ's factorization of it is computed once per statistic (`InputStats.gptq_factor`;
    the same result bit for bit)."""

    def quantize(M: torch.Tensor, H: torch.Tensor | None, keep: qz.Quantized | None = None):
        """`keep`: an earlier result of this quantizer for a matrix of M's shape whose grid (scales and zero
        points, stored spec) GPTQ keeps instead of fitting one (calibrated only)."""
        spec = spec_of(tuple(M.shape))
        if H is None:
            return qz.quantize_dequantize_spec(M, spec, _work(M))
        try:
            factor = None
            if stats is not None and H is stats.H and spec.bits not in qz.FLOAT_BITS:
                factor = stats.gptq_factor(s.damp, s.act_order, _work(M))
            if keep is not None and spec.bits not in qz.FLOAT_BITS:
                return gptq(M, H, keep.spec, damp=s.damp, block_size=s.block_size, act_order=s.act_order,
                            factor=factor, params=keep.params)
            return gptq(M, H, spec, damp=s.damp, block_size=s.block_size, act_order=s.act_order, factor=factor)
        except ValueError as e:
            if "positive definite" not in str(e):
                raise
            raise LplrError(f"the calibration statistics of this weight are singular, and --damp {s.damp:g} adds too "
                            f"little to invert them; pass a larger --damp (the default is 0.01)") from None

    return quantize


class BackboneMemo:
    """Full-size quantized matrices a budget's first pass computed (`Method.candidates`), kept for the conversion that
    follows, which needs the same one at the width chosen (qlr's first backbone is GPTQ of W at b0 bits, exactly what
    the allocation measured). Keyed by the content of W and H and everything the result depends on (spec, GPTQ knobs,
    torch's thread count, which sets the low bits on a CPU), so a hit is the same result bit for bit. Holds the stored
    form only (codes and scales: about a byte per parameter), at most `limit` bytes: the first tensors computed are
    kept, later ones are recomputed by the conversion. `take` removes what it returns."""

    def __init__(self, limit: int):
        self.limit, self.used, self.entries = limit, 0, {}

    @staticmethod
    def key(W: torch.Tensor, stats: InputStats | None, spec: qz.QuantSpec, s: Settings) -> tuple:
        from ..math.fingerprint import tensor_digest

        return (tensor_digest(W), None if stats is None else stats.digest(), str(W.dtype), repr(spec),
                s.damp, s.block_size, s.act_order, torch.get_num_threads())

    def put(self, key: tuple, q: qz.Quantized) -> None:
        size = sum(t.numel() * t.element_size() for t in qz.to_fields(q).values())
        if key not in self.entries and self.used + size <= self.limit:
            self.entries[key] = (q, size)
            self.used += size

    def take(self, key: tuple) -> qz.Quantized | None:
        q, size = self.entries.pop(key, (None, 0))
        self.used -= size
        return q

    def clear(self) -> None:
        self.entries.clear()
        self.used = 0


BACKBONES = BackboneMemo(2 << 30)  # 2 GiB of codes and scales: SmolLM2-135M needs 0.14 GiB, a 7B model ~7


def _work(M: torch.Tensor) -> torch.dtype:
    return torch.float64 if M.dtype == torch.float64 else torch.float32


def calibrated_factors(Wf: torch.Tensor, r: int, s: Settings, seed: int, stats: InputStats,
                       init_left: torch.Tensor | None = None) -> Factors:
    """Rank-r factors against the inputs' second moment: whitened start (SVD, or `init_left`), L quantized by GPTQ
    against R H R^T (one scale per row / row group of L), R refit by least squares and quantized by GPTQ against H;
    the better of two rounds by the whitened objective (`math.qlr.fit_low_rank`)."""
    m, n = Wf.shape
    ql = gptq_quantizer(lambda shape: factor_specs(m, n, r, s, left_rows=True)[0], s)
    qr = gptq_quantizer(lambda shape: factor_specs(m, n, r, s, left_rows=True)[1], s, stats)
    H = stats.H.to(_work(Wf))
    lr = fit_low_rank(Wf, H, stats.whitening(), r, ql, qr, refits=CALIBRATED_REFITS,
                      svd_method=getattr(s, "svd", "auto"), seed=seed, init_left=init_left)
    return Factors(lr.l_stored, lr.r_stored, lr.L.to(Wf.dtype), lr.R.to(Wf.dtype))


def incoherent(W: torch.Tensor, s: Settings, seed: int,
               stats: InputStats | None) -> tuple[torch.Tensor, InputStats | None, Incoherence | None]:
    """(W, stats, None) as they are, or with `s.incoherence` hadamard (the `IncoherenceKnob`) the weight and its
    inputs' statistics in the rotated basis of the tensor's `seed`: (W' = U W V^T, H' = V H V^T, the transform).
    Output errors are the same in both bases (U, V orthogonal), so everything a method computes from W', H' holds
    for W; the rotated statistic is this tensor's alone (no factorization shared with q/k/v: their seeds differ)."""
    if getattr(s, "incoherence", "none") == "none":
        return W, stats, None
    T = Incoherence(tuple(W.shape), seed)
    if stats is not None:
        stats = InputStats(T.rotate_hessian(stats.H), key=f"{stats.key}|{T.kind}:{seed}")
    return T.rotate(W), stats, T


def quant_spec(shape: tuple[int, int], bits: int, s: Settings, channel_dim: int = 0) -> qz.QuantSpec:
    """The QuantSpec of the quantizer knobs in `s` (granularity, group size, scheme, scale dtype, clipping) for a
    matrix of `shape`; minmax stores float32 scales whatever `scale_dtype` says."""
    minmax = s.scheme == "minmax"
    return qz.QuantSpec(tuple(shape), bits, s.quantizer, channel_dim, s.group_size, scheme=s.scheme,
                        scale_dtype="float32" if minmax else s.scale_dtype, clip=None if minmax else s.clip)


def factor_specs(m: int, n: int, r: int, s: Settings, left_rows: bool = False) -> tuple[qz.QuantSpec, qz.QuantSpec]:
    """Left factor (m x r: one scale per column, or with `left_rows` per row / row group like any weight) and right
    factor (r x n, one scale per row)."""
    return quant_spec((m, r), s.b1, s, 0 if left_rows else 1), quant_spec((r, n), s.b2, s, 0)


def factor_bits(m: int, n: int, r: int, s: Settings, left_rows: bool = False) -> int:
    left, right = factor_specs(m, n, r, s, left_rows)
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
    extra: dict = field(default_factory=dict)  # the method's record fields (`MethodResult.extra`)


def quantize_left(Wf: torch.Tensor, Y: torch.Tensor, r: int, s: Settings) -> tuple[qz.Quantized, torch.Tensor]:
    """The stored left factor Q(Y) and its dequantized value. Callers drop Y right after (it is m x r, like L)."""
    left, _ = factor_specs(*Wf.shape, r, s)
    return qz.quantize_dequantize_spec(Y, left, Wf.dtype)


def refit(Wf: torch.Tensor, qL: qz.Quantized, L: torch.Tensor, r: int, s: Settings, energy=None,
          sv=None) -> Factors:
    """Solve for R in least squares against the quantized left factor, quantize R (LPLR's and LSVD's second half)."""
    _, right = factor_specs(*Wf.shape, r, s)
    sol = solve_normal(L, Wf, qL)
    qR, R = qz.quantize_dequantize_spec(sol.R, right, Wf.dtype)
    # The unquantized R is dropped with `sol` here, before the error's temporaries.
    return Factors(qL, qR, L, R, sol.gram, sol.cross, sol.chol, energy, sv)


class FactoredMethod(Method):
    """W ~ L R with L (m x r) and R (r x n) stored quantized. Subclasses implement `factors`."""

    factored = True
    settings_cls = FactoredSettings
    parts = (C.PART_LEFT, C.PART_RIGHT)

    def rank_for(self, W: torch.Tensor, s: Settings, calibrated: bool = False) -> int:
        m, n = W.shape
        return resolve_rank(s.rank, m, n, bits_for_rank=lambda r: factor_bits(m, n, r, s, calibrated),
                            singular_values=lambda: singular_values(W))

    def factors(self, W: torch.Tensor, r: int, s: Settings, seed: int) -> Factors:
        """The rank-r factors of float W (the published method, without calibration)."""
        raise NotImplementedError

    def calibrated_basis(self, W: torch.Tensor, r: int, s: Settings, seed: int,
                         stats: InputStats) -> torch.Tensor | None:
        """The left basis a calibrated fit starts from (None: the whitened SVD); see `calibrated_factors`."""
        return None

    def compress(self, W: torch.Tensor, settings: Settings, seed: int, stats=None) -> MethodResult:
        Wf = float_matrix(W, self.name)
        calibrated = stats is not None and self.uses_stats
        r = self.rank_for(Wf, settings, calibrated)
        if calibrated:
            basis = self.calibrated_basis(Wf, r, settings, seed, stats)
            f = calibrated_factors(Wf, r, settings, seed, stats, init_left=basis)
        else:
            f = self.factors(Wf, r, settings, seed)
        parts = {**quant_parts(C.PART_LEFT, f.qL), **quant_parts(C.PART_RIGHT, f.qR)}
        info = {"rank": r, "left": f.qL.spec.to_json(), "right": f.qR.spec.to_json()}
        bits = qz.stored_bits(f.qL.spec) + qz.stored_bits(f.qR.spec)
        # Deferred: the identity reuses the solve's products (0.37 s on an 11008x4096 matrix), which a conversion
        # does not need, as it measures the decoded tensor.
        return MethodResult(parts, info, bits, None, r, f.energy, spectrum=f.sv, extra=f.extra, error_fn=lambda: factor_relative_error(
            Wf, f.L, f.R, gram=f.gram, cross=f.cross, chol=f.chol))

    def decode_factors(self, parts: dict[str, torch.Tensor], info: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return (decode_quant(C.PART_LEFT, parts, info["left"]), decode_quant(C.PART_RIGHT, parts, info["right"]))

    def layout(self, info: dict) -> PackedLayout:
        return PackedLayout(left=QuantPart.of(C.PART_LEFT, info["left"]),
                            right=QuantPart.of(C.PART_RIGHT, info["right"]))

    def decode(self, parts: dict[str, torch.Tensor], info: dict) -> torch.Tensor:
        return product(*self.decode_factors(parts, info))

    def candidates(self, W, settings, stats, target, fixed, seed=0):
        """Every rank of `rank_grid`, with an estimated output error: the spectral tail (whitened with calibration)
        of the best unquantized rank-r factorization, plus, without calibration, the quantization excess measured by
        compressing once at the rank a uniform `target` bits/param gives (r0), taken to grow in proportion to r (as
        the number of quantized factor entries does). Without that term a budget picks full-rank low-bit factors,
        whose quantization noise the spectrum does not show (all-MiniLM-L6-v2, lplr 4/4 at 8.25 bits/param: cosine
        0.009 with the tail alone, 0.19 with the term; at 4.25: 0.436 and 0.486). With calibration that measurement
        costs GPTQ on every factor (50x the conversion's time here) for little (lsvd 4/4 at 4.25: 0.838 without,
        0.843 with it), so the tail alone is used. A rank given explicitly (`rank` in `fixed`) is kept: no choices."""
        if "rank" in fixed:
            return None
        Wf = float_matrix(W, self.name)
        m, n = Wf.shape
        calibrated = stats is not None and self.uses_stats
        tails, total = whitened_tails(Wf, stats if calibrated else None)
        den = max(output_energy(Wf, stats) if stats is not None else total, 1e-300)
        bits = lambda r: factor_bits(m, n, r, settings, calibrated)
        excess = 0.0
        if not calibrated:
            r0 = _uniform_rank(m, n, target, bits)
            excess = max(self._measured_error(Wf, settings, r0, None) - tails[r0] / den, 0.0) / r0
        return [Candidate({"rank": RankPolicy("rank", r)}, bits(r), tails[r] / den + excess * r)
                for r in rank_grid(min(m, n), start=1)]

    def _measured_error(self, Wf, settings, r: int, stats) -> float:
        """The relative squared weight error of compressing (without calibration) at rank r."""
        from dataclasses import replace

        res = self.compress(Wf, replace(settings, rank=RankPolicy("rank", r)), 0, stats)
        return float(relative_error(Wf, self.decode(res.parts, res.info))) ** 2

    def predict(self, shape, dtype, settings, calibrated=False):
        m, n = shape
        if settings.rank.needs_spectrum:
            return None, {}
        rows = calibrated and self.uses_stats
        r = resolve_rank(settings.rank, m, n, bits_for_rank=lambda k: factor_bits(m, n, k, settings, rows))
        left, right = factor_specs(m, n, r, settings, rows)
        return r, {**predict_quant(C.PART_LEFT, left), **predict_quant(C.PART_RIGHT, right)}


class DirectQuantMethod(Method):
    """W quantized as one full-size matrix (one scale per output row or row group), stored as `PART_QUANT`.
    Subclasses set `settings_cls` (with `BitsKnob` and `QuantKnobs`) and say whether the quantization uses
    calibration statistics (`uses_stats`): GPTQ against H, or round-to-nearest."""

    parts = (C.PART_QUANT,)

    def spec(self, shape, s: Settings) -> qz.QuantSpec:
        return quant_spec(shape, s.b0, s, 0)

    def compress(self, W, settings, seed, stats=None):
        Wf, stats, T = incoherent(float_matrix(W, self.name), settings, seed, stats if self.uses_stats else None)
        H = stats.H if stats is not None else None
        q, W_hat = gptq_quantizer(lambda shape: self.spec(shape, settings), settings, stats)(Wf, H)
        info = {"q": q.spec.to_json()} | ({} if T is None else {C.INFO_INCOHERENCE: T.to_json()})
        return MethodResult(quant_parts(C.PART_QUANT, q), info, qz.stored_bits(q.spec), relative_error(Wf, W_hat))

    def decode(self, parts, info):
        W = decode_quant(C.PART_QUANT, parts, info["q"])
        T = incoherence_of(info, W.shape)
        return W if T is None else T.restore(W)

    def layout(self, info: dict) -> PackedLayout:
        backbone = QuantPart.of(C.PART_QUANT, info["q"])
        return PackedLayout(backbone=backbone, transform=incoherence_of(info, backbone.spec.shape))

    def predict(self, shape, dtype, settings, calibrated=False):
        return None, predict_quant(C.PART_QUANT, self.spec(shape, settings))

    def candidates(self, W, settings, stats, target, fixed, seed=0):
        """Each width of `bit_choices` (unless b0 is fixed), with the output error of actually quantizing at it (in
        the rotated basis with `incoherence`: the same output error)."""
        from dataclasses import replace

        from ..math.weighted import weighted_error

        Wf, stats, _ = incoherent(float_matrix(W, self.name), settings, seed, stats)
        H = stats.H if stats is not None and self.uses_stats else None
        den = output_energy(Wf, stats)
        out = []
        widths = [settings.b0] if "b0" in fixed else bit_choices(
            target, lambda b: qz.stored_bits(self.spec(Wf.shape, replace(settings, b0=b))), Wf.numel())
        for b in widths:
            s = replace(settings, b0=b)
            q, W_hat = gptq_quantizer(lambda shape, s=s: self.spec(shape, s), s, stats)(Wf, H)
            err = weighted_error(Wf, W_hat, stats.H) if stats is not None else (Wf - W_hat).double().square().sum()
            out.append(Candidate({"b0": b}, qz.stored_bits(q.spec), float(err) / max(den, 1e-300)))
        return out


# ------------------------------------------------------------------------------------------- global bit budgets


def _uniform_rank(m: int, n: int, target: float, bits_for_rank) -> int:
    """The largest rank whose stored bits fit `target` bits/param (at least 1, at most min(m, n))."""
    lo, hi = 1, min(m, n)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if bits_for_rank(mid) <= target * m * n else (lo, mid - 1)
    return lo


def rank_grid(full: int, start: int = 0) -> list[int]:
    """Ranks a budget chooses from: every rank up to 16, then steps of about 6 % (fine where it matters, ~100
    candidates for a 4096-wide matrix), and `full`."""
    ranks, r = [], start
    while r < full:
        ranks.append(r)
        r = r + 1 if r < 16 else max(r + 1, math.ceil(r * 1.06))
    return [*ranks, full]


def whitened_tails(E: torch.Tensor, stats: InputStats | None) -> tuple[list[float], float]:
    """(tails, total): tails[r] = sum_{i >= r} sigma_i(E S)^2 (the output error left by the best unquantized rank-r
    correction of E, exact when S S^T = H; S = I without calibration) and the relative scale tr(E H E^T)."""
    from ..math.svd import singular_values
    from ..math.whiten import whitened_singular_values

    sigma = singular_values(E) if stats is None else whitened_singular_values(E, stats.whitening())
    s2 = sigma.double().square().flip(0)
    tails = torch.cat([s2.new_zeros(1), s2.cumsum(0)]).flip(0).tolist()
    return tails, tails[0]


def output_energy(W: torch.Tensor, stats: InputStats | None) -> float:
    """tr(W H W^T) (||W||_F^2 without calibration), the denominator of a relative squared output error."""
    from ..math.weighted import weighted_error

    if stats is None:
        return float(W.double().square().sum())
    return float(weighted_error(W, torch.zeros_like(W), stats.H))


def bit_choices(target: float, bits_of: Callable[[int], int], numel: int) -> list[int]:
    """The width a budget of `target` bits/param gives a full-size matrix (the documented rule of
    `--target-bits-per-param`): the widest of 1..8 whose stored bits (scales included) fit target bits/param, else 1.

    One width for all tensors: letting the allocator trade widths between tensors by their output errors was
    measured worse (all-MiniLM-L6-v2, qlr at 4.25 bits/param: cosine 0.987 against 0.990 with one width), since a
    layer's relative output error does not say how much the model's output depends on it."""
    fitting = [b for b in range(1, 9) if bits_of(b) <= target * numel]
    return [max(fitting)] if fitting else [1]
