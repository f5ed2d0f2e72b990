"""Copy: the weight stored verbatim (for tensors a plan leaves alone)."""

from __future__ import annotations

from dataclasses import dataclass

from ..dtypes import dtype_bits, dtype_name
from .base import Method, MethodResult, register
from .settings import Settings


@dataclass(frozen=True)
class CopySettings(Settings):
    """No knobs: the tensor is stored as it is."""


@register("copy")
class Copy(Method):
    settings_cls = CopySettings
    parts = ("",)

    def compress(self, W, settings, seed, stats=None):
        return MethodResult({"": W}, {"dtype": dtype_name(W.dtype)}, W.numel() * dtype_bits(W.dtype), 0.0)

    def decode(self, parts, info):
        return parts[""]

    def predict(self, shape, dtype, settings, calibrated=False):
        return None, {"": (dtype_name(dtype), tuple(shape))}
