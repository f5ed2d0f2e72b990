"""GPTQ (Frantar et al. 2022): W quantized column by column with error feedback through the inverse input second
moment H = E[x x^T] from calibration (`math.gptq`). Without calibration it is round-to-nearest (exactly GPTQ with
H = I), with GPTQ's customary defaults. Stored like rtn: one quantized full-size matrix."""

from __future__ import annotations

from dataclasses import dataclass

from ._common import DirectQuantMethod
from .base import register
from .settings import BitsKnob, GPTQKnobs, IncoherenceKnob, QuantKnobs, redefault


@dataclass(frozen=True)
class GPTQSettings(BitsKnob, QuantKnobs, GPTQKnobs, IncoherenceKnob):
    """GPTQ W4A16 as usually meant: 4-bit, symmetric, groups of 128 inputs, float16 scales, activation order with
    static groups."""

    b0: int = redefault(BitsKnob, "b0", 4)
    quantizer: str = redefault(QuantKnobs, "quantizer", "group")
    group_size: int | None = redefault(QuantKnobs, "group_size", 128)
    scheme: str = redefault(QuantKnobs, "scheme", "symmetric")
    act_order: bool = redefault(GPTQKnobs, "act_order", True)


@register("gptq")
class GPTQ(DirectQuantMethod):
    settings_cls = GPTQSettings
    uses_stats = True
