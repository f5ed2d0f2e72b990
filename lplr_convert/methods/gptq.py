"""GPTQ (Frantar et al. 2022): W quantized column by column with error feedback through the inverse input second
moment H = E[x x^T] from calibration (`math.gptq`). Without calibration it is round-to-nearest (exactly GPTQ with
H = I), with GPTQ's customary defaults. Stored like rtn: one quantized full-size matrix."""

from __future__ import annotations

from dataclasses import dataclass

from ._common import DirectQuantMethod
from .base import register
from .settings import GRID_CLIP, GRID_SCHEME, BitsKnob, GPTQKnobs, IncoherenceKnob, QuantKnobs, redefault


@dataclass(frozen=True)
class GPTQSettings(BitsKnob, QuantKnobs, GPTQKnobs, IncoherenceKnob):
    """GPTQ W4A16: 4-bit, groups of 128 inputs, float16 scales, activation order with static groups, on the
    asymmetric grid (an integer zero point per group, stored at b0 bits: +b0/128 bit/param at groups of 128) with MSE
    clipping (`GRID_SCHEME`, `GRID_CLIP`): measured better than GPTQ's customary symmetric absmax grid at 2-8 bits on
    all-MiniLM-L6-v2 and at 3-4 bits on SmolLM2-135M-Instruct (artifacts/quality/results.md,
    artifacts/quality/decoder/NOTES.md section 4). The symmetric grid (`--scheme symmetric`; a recipe's `clip: null`
    for no clipping) is what other tools' W4A16 presets and vLLM's symmetric kernels mean."""

    b0: int = redefault(BitsKnob, "b0", 4)
    quantizer: str = redefault(QuantKnobs, "quantizer", "group")
    group_size: int | None = redefault(QuantKnobs, "group_size", 128)
    scheme: str = redefault(QuantKnobs, "scheme", GRID_SCHEME)
    clip: str | None = redefault(QuantKnobs, "clip", GRID_CLIP)
    act_order: bool = redefault(GPTQKnobs, "act_order", True)


@register("gptq")
class GPTQ(DirectQuantMethod):
    settings_cls = GPTQSettings
    uses_stats = True
