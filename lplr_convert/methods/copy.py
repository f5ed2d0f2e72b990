"""Copy: the weight stored verbatim (for tensors a plan leaves alone)."""

from __future__ import annotations

from ..dtypes import dtype_bits, dtype_name
from .base import Method, MethodResult, register
from .settings import Settings


@register("copy")
class Copy(Method):
    settings_cls = Settings
    parts = ("",)

    def compress(self, W, settings, seed, stats=None):
        return MethodResult({"": W}, {"dtype": dtype_name(W.dtype)}, W.numel() * dtype_bits(W.dtype), 0.0)

    def decode(self, parts, info):
        return parts[""]

    def predict(self, shape, dtype, settings, calibrated=False):
        return None, {"": (dtype_name(dtype), tuple(shape))}
