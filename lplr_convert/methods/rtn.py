"""Round-to-nearest: the weight quantized directly to b0 bits (the baseline users would pick instead)."""

from __future__ import annotations

from dataclasses import dataclass

from ._common import DirectQuantMethod
from .base import register
from .settings import BitsKnob, QuantKnobs


@dataclass(frozen=True)
class RTNSettings(BitsKnob, QuantKnobs):
    pass


@register("rtn")
class RTN(DirectQuantMethod):
    settings_cls = RTNSettings
