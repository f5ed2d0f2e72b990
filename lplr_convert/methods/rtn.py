"""Round-to-nearest: the weight quantized directly to b0 bits (the baseline users would pick instead)."""

from __future__ import annotations

from ._common import DirectQuantMethod
from .base import register


@register("rtn")
class RTN(DirectQuantMethod):
    """Each output row (or row group) quantized on its own grid, ignoring calibration statistics."""
