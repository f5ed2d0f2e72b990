"""Copy: the weight stored verbatim (for tensors a plan leaves alone)."""

from __future__ import annotations

from ._common import DTYPE_BITS, dtype_name
from .base import Method, MethodResult, register


@register("copy")
class Copy(Method):
    uses_rank = False

    def compress(self, W, settings, seed):
        bits = W.numel() * DTYPE_BITS.get(W.dtype, W.element_size() * 8)
        return MethodResult({"": W}, {"dtype": dtype_name(W.dtype)}, bits, 0.0)

    def decode(self, parts, info):
        return parts[""]

    def predict(self, shape, dtype, settings):
        return None, {"": (dtype_name(dtype), tuple(shape))}
