"""Round-to-nearest: the weight quantized directly to b0 bits (the baseline users would pick instead)."""

from __future__ import annotations

from dataclasses import dataclass

from .. import constants as C
from ..math import quantize as qz
from ..math.error import relative_error
from ._common import decode_quant, float_matrix, predict_quant, quant_parts
from .base import Method, MethodResult, register
from .settings import BitsKnob, QuantKnobs


@dataclass(frozen=True)
class RTNSettings(BitsKnob, QuantKnobs):
    pass


def _spec(shape, s) -> qz.QuantSpec:
    return qz.QuantSpec(tuple(shape), s.b0, s.quantizer, 0, s.group_size)  # one scale per output row


@register("rtn")
class RTN(Method):
    settings_cls = RTNSettings
    parts = (C.PART_QUANT,)

    def compress(self, W, settings, seed):
        Wf = float_matrix(W, self.name)
        spec = _spec(Wf.shape, settings)
        q = qz.quantize(Wf, spec.bits, spec.granularity, spec.channel_dim, spec.group_size)
        err = relative_error(Wf, qz.dequantize(q, Wf.dtype))
        return MethodResult(quant_parts(C.PART_QUANT, q), {"q": q.spec.to_json()}, qz.stored_bits(q.spec), err)

    def decode(self, parts, info):
        return decode_quant(C.PART_QUANT, parts, info["q"])

    def predict(self, shape, dtype, settings):
        return None, predict_quant(C.PART_QUANT, _spec(shape, settings))
