"""Round-to-nearest: the weight quantized directly to b0 bits (the baseline users would pick instead)."""

from __future__ import annotations

from dataclasses import dataclass

from ._common import DirectQuantMethod
from .base import register
from .settings import BitsKnob, QuantKnobs


@dataclass(frozen=True)
class RTNSettings(BitsKnob, QuantKnobs):
    """The width b0 and the quantizer (granularity, group size, grid, scale dtype, clipping)."""


@register("rtn")
class RTN(DirectQuantMethod):
    """Each output row (or row group) quantized on its own grid, ignoring calibration statistics."""

    settings_cls = RTNSettings
