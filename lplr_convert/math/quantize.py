"""Uniform min-max quantizers with tensor, channel and group granularity, plus 16/32-bit float casts.

A b-bit quantized value is ``zero + code * scale`` with ``code`` in ``[0, 2**b - 1]``: the published min-max
quantizer (2**b levels spanning [min, max], zero not exactly representable), with one (scale, zero) pair per
tensor, per channel, or per group of ``group_size`` consecutive entries along the input (last) dimension.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import bitpack

INT_BITS = tuple(range(1, 9))
FLOAT_BITS = (16, 32)
ALLOWED_BITS = INT_BITS + FLOAT_BITS
GRANULARITIES = ("tensor", "channel", "group")
SCALE_BITS = 32  # scale and zero are stored as float32

__all__ = [
    "ALLOWED_BITS",
    "GRANULARITIES",
    "QuantSpec",
    "Quantized",
    "check_bits",
    "dequantize",
    "field_specs",
    "from_fields",
    "quantize",
    "quantize_dequantize",
    "stored_bits",
    "to_fields",
]


def check_bits(bits: int) -> int:
    """Return `bits` if it is an allowed width, else raise ValueError listing the allowed ones."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in ALLOWED_BITS:
        raise ValueError(f"bits={bits!r} is not supported; use one of 1-8 (integer codes), 16 (fp16/bf16) or 32 (fp32)")
    return bits


@dataclass(frozen=True)
class QuantSpec:
    """How a 2-D matrix of `shape` is quantized. `channel_dim` is the dim whose entries each get a scale."""

    shape: tuple[int, int]
    bits: int
    granularity: str = "channel"
    channel_dim: int = 0
    group_size: int | None = None
    float_dtype: str | None = None  # "float16" | "bfloat16" | "float32" when bits >= 16

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"quantizer granularity {self.granularity!r} is unknown; use one of {', '.join(GRANULARITIES)}")
        if self.granularity == "group" and (self.group_size is None or self.group_size < 1):
            raise ValueError("group granularity needs a positive group size (--group-size, e.g. 128)")
        if self.channel_dim not in (0, 1):
            raise ValueError("channel_dim must be 0 (rows) or 1 (columns)")

    @property
    def scale_shape(self) -> tuple[int, ...]:
        m, n = self.shape
        if self.granularity == "tensor":
            return (1, 1)
        if self.granularity == "channel":
            return (m, 1) if self.channel_dim == 0 else (1, n)
        return (m, math.ceil(n / self.group_size))

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "bits": self.bits, "granularity": self.granularity,
                "channel_dim": self.channel_dim, "group_size": self.group_size, "float_dtype": self.float_dtype}

    @classmethod
    def from_json(cls, d: dict) -> QuantSpec:
        return cls(shape=tuple(d["shape"]), bits=d["bits"], granularity=d["granularity"],
                   channel_dim=d["channel_dim"], group_size=d.get("group_size"), float_dtype=d.get("float_dtype"))


@dataclass
class Quantized:
    """Integer codes (uint8, same shape as the input) with their scales, or a float cast when bits >= 16."""

    spec: QuantSpec
    codes: torch.Tensor
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None


def _grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """View (m, n) as (m, G, g), padding the last group by repeating the row's last value."""
    m, n = x.shape
    groups = math.ceil(n / group_size)
    pad = groups * group_size - n
    if pad:
        x = torch.cat([x, x[:, -1:].expand(m, pad)], dim=1)
    return x.reshape(m, groups, group_size)


def _float_dtype(x: torch.Tensor, bits: int) -> torch.dtype:
    if bits == 32:
        return torch.float32
    finite_max = torch.finfo(torch.float16).max
    return torch.float16 if x.abs().max() <= finite_max else torch.bfloat16


def _check_matrix(x: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"quantize expects a 2-D tensor, got shape {tuple(x.shape)}")


def _int_quantized(x: torch.Tensor, spec: QuantSpec) -> tuple[Quantized, torch.Tensor]:
    """`Quantized` for an integer-width tensor/channel spec, and the fresh float buffer (x's shape) holding its codes.

    Every step after the first subtraction works in place on that one buffer: an 11008 x 3277 factor then costs one
    float temporary instead of four (each a fresh allocation whose pages are faulted in anew).
    """
    xf = x if x.dtype == torch.float64 else x.float()
    if spec.granularity == "tensor":
        lo, hi = xf.amin().reshape(1, 1), xf.amax().reshape(1, 1)
    else:
        dim = 1 - spec.channel_dim
        lo, hi = xf.amin(dim=dim, keepdim=True), xf.amax(dim=dim, keepdim=True)
    scale = _step(lo, hi, spec.bits)
    codes = xf - lo
    codes.div_(scale).round_().clamp_(0, (1 << spec.bits) - 1)
    return Quantized(spec, codes.to(torch.uint8), scale.float(), lo.float()), codes


def _step(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantization step (hi - lo) / (2**bits - 1), 1 where the range is empty (a constant group)."""
    scale = (hi - lo) / ((1 << bits) - 1)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize(x: torch.Tensor, bits: int, granularity: str = "channel", channel_dim: int = 0,
             group_size: int | None = None) -> Quantized:
    """Quantize a 2-D float tensor. Computation is float32 (float64 inputs stay float64)."""
    _check_matrix(x)
    spec = QuantSpec(tuple(x.shape), check_bits(bits), granularity, channel_dim, group_size)
    if bits in FLOAT_BITS:
        dtype = _float_dtype(x, bits)
        spec = QuantSpec(spec.shape, bits, granularity, channel_dim, group_size, str(dtype).removeprefix("torch."))
        return Quantized(spec, x.to(dtype))
    if granularity != "group":
        return _int_quantized(x, spec)[0]
    xf = x if x.dtype == torch.float64 else x.float()
    g = _grouped(xf, group_size)
    lo, hi = g.amin(dim=2), g.amax(dim=2)
    scale = _step(lo, hi, bits)
    codes = torch.round((g - lo.unsqueeze(2)) / scale.unsqueeze(2)).clamp_(0, (1 << bits) - 1)
    codes = codes.reshape(x.shape[0], -1)[:, : x.shape[1]]
    return Quantized(spec, codes.to(torch.uint8), scale.float(), lo.float())


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def dequantize(q: Quantized, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reconstruct the float matrix from a `Quantized`."""
    spec = q.spec
    if spec.bits in FLOAT_BITS:
        return q.codes.to(dtype)
    work = _work_dtype(dtype)
    codes = q.codes.to(work)
    scale, zero = q.scale.to(work), q.zero.to(work)
    if spec.granularity == "group":
        m, n = spec.shape
        g = _grouped(codes, spec.group_size)
        out = (zero.unsqueeze(2) + g * scale.unsqueeze(2)).reshape(m, -1)[:, :n]
    else:
        out = zero + codes * scale
    return out.to(dtype)


def quantize_dequantize(x: torch.Tensor, bits: int, granularity: str = "channel", channel_dim: int = 0,
                        group_size: int | None = None, dtype: torch.dtype = torch.float32,
                        ) -> tuple[Quantized, torch.Tensor]:
    """`(q, dequantize(q, dtype))` for `q = quantize(x, ...)`, bit for bit, reusing the codes' float buffer.

    The dequantized matrix is formed with the stored (float32) scale and zero, in the same operations as
    `dequantize`, so it is exactly what a loader reconstructs from the packed codes.
    """
    _check_matrix(x)
    if bits in FLOAT_BITS or granularity == "group":
        q = quantize(x, bits, granularity, channel_dim, group_size)
        return q, dequantize(q, dtype)
    q, codes = _int_quantized(x, QuantSpec(tuple(x.shape), check_bits(bits), granularity, channel_dim, group_size))
    work = _work_dtype(dtype)
    if codes.dtype != work:
        return q, dequantize(q, dtype)
    out = codes.mul_(q.scale.to(work)).add_(q.zero.to(work))  # = zero + codes * scale, as in `dequantize`
    return q, out.to(dtype)


def stored_bits(spec: QuantSpec) -> int:
    """Exact bits a quantized matrix occupies on disk: packed codes (whole bytes), scales and zeros."""
    m, n = spec.shape
    if spec.bits in FLOAT_BITS:
        return m * n * spec.bits
    nscales = math.prod(spec.scale_shape)
    return 8 * bitpack.packed_nbytes(m * n, spec.bits) + 2 * nscales * SCALE_BITS


def field_specs(spec: QuantSpec, float_dtype: str = "float16") -> dict[str, tuple[str, tuple[int, ...]]]:
    """Field name -> (dtype name, shape) of what `to_fields` stores, without computing anything."""
    m, n = spec.shape
    if spec.bits in FLOAT_BITS:
        return {"": (spec.float_dtype or ("float32" if spec.bits == 32 else float_dtype), (m, n))}
    return {"packed": ("uint8", (bitpack.packed_nbytes(m * n, spec.bits),)),
            "scale": ("float32", spec.scale_shape), "zero": ("float32", spec.scale_shape)}


def to_fields(q: Quantized) -> dict[str, torch.Tensor]:
    """Tensors to store: {"": float matrix} for 16/32 bits, else {"packed", "scale", "zero"}."""
    if q.spec.bits in FLOAT_BITS:
        return {"": q.codes.contiguous()}
    # Codes of a `Quantized` are in range by construction (clamped by `quantize`, masked by `unpack`).
    return {"packed": bitpack.pack(q.codes, q.spec.bits, check=False), "scale": q.scale.contiguous(),
            "zero": q.zero.contiguous()}


def from_fields(fields: dict[str, torch.Tensor], spec: QuantSpec) -> Quantized:
    """Inverse of `to_fields`; raises ValueError when a field is missing or has the wrong shape."""
    m, n = spec.shape
    if spec.bits in FLOAT_BITS:
        values = fields[""]
        if tuple(values.shape) != (m, n):
            raise ValueError(f"stored matrix has shape {tuple(values.shape)}, expected {(m, n)}")
        return Quantized(spec, values)
    for name in ("packed", "scale", "zero"):
        if name not in fields:
            raise ValueError(f"stored quantized matrix lacks its '{name}' tensor")
    if tuple(fields["scale"].shape) != spec.scale_shape or tuple(fields["zero"].shape) != spec.scale_shape:
        raise ValueError(f"stored scales have shape {tuple(fields['scale'].shape)}, expected {spec.scale_shape}")
    if fields["packed"].dtype != torch.uint8:
        raise ValueError(f"stored codes have dtype {fields['packed'].dtype}, expected uint8")
    codes = bitpack.unpack(fields["packed"], spec.bits, m * n).reshape(m, n)
    return Quantized(spec, codes, fields["scale"].float(), fields["zero"].float())
