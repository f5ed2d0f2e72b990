"""qlr: W ~ Q + L R, a full-size quantized backbone Q (GPTQ against H at b0 bits) plus a low-rank correction L R of the
whitened residual at b1/b2 bits, refitted alternately (CALDERA, Saha et al. 2024; `math.qlr`). The best iterate by
the output error tr(D H D^T) is kept, the backbone alone among the candidates, so it is never worse than `gptq` with
the same backbone. Without calibration H = I (the LoftQ alternation on the weight error).

The rank policy chooses the correction's rank (0 allowed: the backbone alone); `bits_per_param` counts everything
stored, backbone included.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .. import constants as C
from ..math import quantize as qz
from ..math.error import relative_error
from ..math.lowrank import product
from ..math.qlr import qlr
from ..math.svd import singular_values
from ._common import (
    BACKBONES,
    CalibratedFactoredSettings,
    bit_choices,
    decode_quant,
    factor_bits,
    factor_specs,
    float_matrix,
    gptq_quantizer,
    incoherent,
    output_energy,
    predict_quant,
    quant_parts,
    quant_spec,
    rank_grid,
    whitened_tails,
)
from .base import Candidate, InputStats, Method, MethodResult, PackedLayout, QuantPart, incoherence_of, register
from .settings import (
    GRID_CLIP,
    GRID_SCHEME,
    MAX_ITERATIONS,
    BitsKnob,
    GPTQKnobs,
    IncoherenceKnob,
    QuantKnobs,
    RankKnobs,
    RankPolicy,
    iteration_count,
    knob,
    redefault,
    resolve_rank,
)


@dataclass(frozen=True)
class QLRSettings(CalibratedFactoredSettings, BitsKnob, IncoherenceKnob):
    """Backbone b0 bits, factors b1/b2 bits, one quantizer for all: asymmetric (integer zero point), groups of 128,
    float16 scales, MSE clipping, GPTQ in activation order (measured best on all-MiniLM-L6-v2, README)."""

    b0: int = redefault(BitsKnob, "b0", 2)
    b1: int = redefault(CalibratedFactoredSettings, "b1", 4)
    b2: int = redefault(CalibratedFactoredSettings, "b2", 4)
    quantizer: str = redefault(QuantKnobs, "quantizer", "group")
    group_size: int | None = redefault(QuantKnobs, "group_size", 128)
    scheme: str = redefault(QuantKnobs, "scheme", GRID_SCHEME)
    clip: str | None = redefault(QuantKnobs, "clip", GRID_CLIP)
    act_order: bool = redefault(GPTQKnobs, "act_order", True)
    rank: RankPolicy = redefault(RankKnobs, "rank", factory=lambda: RankPolicy("rank_fraction", 0.1))  # noqa: RUF009
    iters: int = knob(2, type=int, validate=iteration_count(1), label="nondefault",
                      help=f"qlr: alternations of the backbone and the low-rank correction (best iterate kept; "
                           f"1-{MAX_ITERATIONS}).")


def _keeping_grid(quantize, first=None):
    """qlr's backbone quantizer: the first backbone (`first`, from a budget's first pass, else the first call) fits
    its grid; the updates Q = quantize(W - L R) keep that grid (scales and zero points) and only re-code against
    it. Measured on SmolLM2-135M (7 linears of block 5, 4-bit g128, rank 16): the same output error to 0.1 %
    (0.05370 against 0.05367) in 60 % of the CPU time, the grid's MSE search being three quarters of a GPTQ call."""
    kept = {} if first is None else {"q": first[0]}

    def quantize_q(M, H):
        q, Q = quantize(M, H, keep=kept.get("q") if H is not None else None)
        kept.setdefault("q", q)
        return q, Q

    return quantize_q


@register("qlr")
class QLR(Method):
    settings_cls = QLRSettings
    parts = (C.PART_QUANT, C.PART_LEFT, C.PART_RIGHT)
    record_fields = ("qlr_best_iterate",)  # which alternation was kept (0: the backbone alone)
    factored = True
    has_base = True
    uses_stats = True

    def _bits(self, m: int, n: int, r: int, s) -> int:
        return qz.stored_bits(quant_spec((m, n), s.b0, s, 0)) + (factor_bits(m, n, r, s, True) if r else 0)

    def rank_for(self, W: torch.Tensor, s) -> int:
        m, n = W.shape
        return resolve_rank(s.rank, m, n, bits_for_rank=lambda r: self._bits(m, n, r, s),
                            singular_values=lambda: singular_values(W), min_rank=0)

    def compress(self, W, settings, seed, stats: InputStats | None = None):
        # With incoherence everything lives in the rotated basis: W' = U W V^T = Q' + L' R' against H' = V H V^T
        # (the output error is the same there), W = U^T (Q' + L' R') V.
        Wf, stats, T = incoherent(float_matrix(W, self.name), settings, seed, stats)
        n = Wf.shape[1]
        r = self.rank_for(Wf, settings)
        H = stats.H.to(Wf.dtype) if stats is not None else torch.eye(n, dtype=Wf.dtype, device=Wf.device)
        white = stats.whitening() if stats is not None else None
        quantize_q = _keeping_grid(gptq_quantizer(lambda shape: quant_spec(shape, settings.b0, settings, 0), settings,
                                                  stats), first := self._first_backbone(Wf, settings, stats))
        res = qlr(Wf, H, r, quantize_q,
                  gptq_quantizer(lambda shape: quant_spec(shape, settings.b1, settings, 0), settings),
                  gptq_quantizer(lambda shape: quant_spec(shape, settings.b2, settings, 0), settings, stats),
                  iters=settings.iters, seed=seed, white=white, q0=first)
        parts = quant_parts(C.PART_QUANT, res.q_stored)
        info = {"rank": r, "q": res.q_stored.spec.to_json(), "left": None, "right": None, "history": res.history,
                "best": res.best} | ({} if T is None else {C.INFO_INCOHERENCE: T.to_json()})
        bits = qz.stored_bits(res.q_stored.spec)
        if res.l_stored is not None:
            parts |= quant_parts(C.PART_LEFT, res.l_stored) | quant_parts(C.PART_RIGHT, res.r_stored)
            info |= {"left": res.l_stored.spec.to_json(), "right": res.r_stored.spec.to_json()}
            bits += qz.stored_bits(res.l_stored.spec) + qz.stored_bits(res.r_stored.spec)
        kept = res.L.shape[1]
        return MethodResult(parts, info, bits, None, kept, extra={"qlr_best_iterate": res.best}, error_fn=lambda: (
            relative_error(Wf, product(res.L.to(Wf.dtype), res.R.to(Wf.dtype), res.Q.to(Wf.dtype)))))

    def candidates(self, W, settings, stats, target, fixed, seed=0):
        """The backbone width of `bit_choices` (unless b0 is fixed) x correction ranks of `rank_grid`: the backbone
        quantized by GPTQ at each width, the correction's error from the whitened residual's spectrum (unquantized
        factors: an estimate; the compression refits and quantizes them); in the rotated basis with incoherence."""
        Wf, stats, _ = incoherent(float_matrix(W, self.name), settings, seed, stats)
        m, n = Wf.shape
        den = max(output_energy(Wf, stats), 1e-300)
        out = []
        widths = [settings.b0] if "b0" in fixed else bit_choices(
            target, lambda b: self._bits(m, n, 0, replace(settings, b0=b)), m * n)
        for b in widths:
            s = replace(settings, b0=b)
            H = None if stats is None else stats.H.to(Wf.dtype)
            q, Q = gptq_quantizer(lambda shape, s=s: quant_spec(shape, s.b0, s, 0), s, stats)(Wf, H)
            if stats is not None:  # the conversion's first backbone at this width (without stats it uses H = I)
                BACKBONES.put(self._backbone_key(Wf, s, stats), q)
            tails, _ = whitened_tails(Wf - Q.to(Wf.dtype), stats)
            if "rank" in fixed:  # the rank given is kept: only the backbone's width is chosen
                r = resolve_rank(s.rank, m, n, bits_for_rank=lambda k, s=s: self._bits(m, n, k, s), min_rank=0)
                out.append(Candidate({"b0": b}, self._bits(m, n, r, s), tails[r] / den))
                continue
            out += [Candidate({"b0": b, "rank": RankPolicy("rank", r)}, self._bits(m, n, r, s), tails[r] / den)
                    for r in rank_grid(min(m, n))]
        return out

    def layout(self, info):
        backbone = QuantPart.of(C.PART_QUANT, info["q"])
        return PackedLayout(backbone=backbone, left=QuantPart.of(C.PART_LEFT, info["left"]),
                            right=QuantPart.of(C.PART_RIGHT, info["right"]),
                            transform=incoherence_of(info, backbone.spec.shape))

    def _backbone_key(self, Wf: torch.Tensor, s, stats: InputStats | None) -> tuple:
        return BACKBONES.key(Wf, stats, quant_spec(tuple(Wf.shape), s.b0, s, 0), s)

    def _first_backbone(self, Wf: torch.Tensor, s, stats: InputStats | None):
        """(stored, dequantized) first backbone GPTQ(W) at b0 bits if the budget's first pass left it (`BACKBONES`;
        the same bits as computing it), else None. Calibrated only: without, the pass rounds to nearest and qlr
        runs GPTQ with H = I, equal in value but not promised bit for bit."""
        if stats is None or not BACKBONES.entries:
            return None
        q = BACKBONES.take(self._backbone_key(Wf, s, stats))
        return None if q is None else (q, qz.dequantize(q, Wf.dtype))

    def decode_base(self, parts, info) -> torch.Tensor:
        """The backbone in the original basis (U^T Q' V with incoherence)."""
        Q = decode_quant(C.PART_QUANT, parts, info["q"])
        T = incoherence_of(info, Q.shape)
        return Q if T is None else T.restore(Q)

    def decode_factors(self, parts, info):
        """(L, R) in the original basis (U^T L', R' V with incoherence: U^T (Q' + L' R') V = U^T Q' V + L R)."""
        if info.get("left") is None:
            m, n = info["q"]["shape"]
            return torch.zeros(m, 0), torch.zeros(0, n)
        L, R = decode_quant(C.PART_LEFT, parts, info["left"]), decode_quant(C.PART_RIGHT, parts, info["right"])
        T = incoherence_of(info, (L.shape[0], R.shape[1]))
        return (L, R) if T is None else (T.restore_left(L), T.restore_right(R))

    def decode(self, parts, info):
        return product(*self.decode_factors(parts, info), self.decode_base(parts, info))

    def predict(self, shape, dtype, settings, calibrated=False):
        m, n = shape
        if settings.rank.needs_spectrum:
            return None, {}
        r = resolve_rank(settings.rank, m, n, bits_for_rank=lambda k: self._bits(m, n, k, settings), min_rank=0)
        out = predict_quant(C.PART_QUANT, quant_spec((m, n), settings.b0, settings, 0))
        if r:
            left, right = factor_specs(m, n, r, settings, left_rows=True)
            out |= predict_quant(C.PART_LEFT, left) | predict_quant(C.PART_RIGHT, right)
        return r, out

