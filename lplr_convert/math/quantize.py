"""Uniform b-bit quantizers (three schemes; tensor, channel and group granularity), plus 16/32-bit float casts.

Granularity: one set of parameters per tensor, per channel (`channel_dim` 0: per row, 1: per column), or per group of
`group_size` consecutive entries along dim 1 of each row (the last group of a row may be shorter).

Notation: L = 2**b - 1, o = 2**(b-1), q_min = -o, q_max = o - 1; the stored code c is an integer in [0, L]; lo, hi
are the minimum and maximum of a parameter group; round is half-to-even (torch.round); arithmetic is float32
(float64 inputs stay float64).

- "minmax" (the published quantizer, the tool's original format; bit-identical to it): s = (hi - lo) / L (1 when
  the range is empty), c = clamp(round((x - lo) / s), 0, L), value = lo + c * s. Stores float32 `scale` s and `zero`
  lo. Zero is not exactly representable, which hurts outputs (see the notes); kept so existing outputs decode.
- "symmetric" (compressed-tensors' symmetric int): lo' = min(lo, 0), hi' = max(hi, 0), s = max(-lo', hi') / (L / 2),
  q = clamp(round(x / s), q_min, q_max), c = q + o, value = (c - o) * s. Stores `scale` only. As in
  compressed-tensors, x / s lies in [-L/2, L/2], so the code q_min is used only by a -L/2 tie and 1 bit decodes to 0.
- "asymmetric" (compressed-tensors' asymmetric int, integer zero point): s = (hi' - lo') / L,
  z = round(clamp(q_min - lo' / s, q_min, q_max)) (from the unrounded s, as compressed-tensors does),
  q = clamp(round(x / s_st + z), q_min, q_max) with s_st the stored scale, c = q + o, zp = z + o,
  value = (c - zp) * s_st. Stores `scale` and `zero_point` (zp as uint8 bit-packed at b bits). c = zp is exactly 0.

Symmetric and asymmetric scales are stored as `scale_dtype` (float32 or float16) and codes are computed with the
stored value, so decoding the stored fields reproduces the quantized matrix exactly. An empty range (s = 0: an all-zero
group) gets the machine epsilon of the scale dtype as its scale, as in compressed-tensors, and z = 0 (where
compressed-tensors computes 0/0 and casts NaN to int8, which gives 0 on x86), so it decodes to 0. Tiny scales are
floored at the dtype's smallest positive number (2**-24 for float16, a subnormal): such a group's step may exceed its
range, and it decodes to within half a step (a few tiny groups beside normal ones cost the matrix nothing). Where a
float16 scale would overflow, or where every non-empty group's scale underflows below 2**-16 (subnormals keeping fewer
than 8 significant bits: a matrix of std 1e-7 at 8 bits came out as noise, relative error 0.17 against 0.006), the
whole matrix is quantized with float32 scales instead and its spec says scale_dtype "float32": the spec always says
what is on disk.

clip="mse" (symmetric/asymmetric): for each parameter group, the range (lo, hi) is shrunk to (p lo, p hi) for
p = 1 - k/100, k = 0..79 (GPTQ's `find_params`: grid 100, maxshrink 0.8, norm 2.4; llm-compressor's "mse" observer
stops at 0.8 x with a patience of 5, too narrow at 2-3 bits), and the parameters of the p with the least
sum |x_hat - x|**2.4 over the group are kept (the first minimum, so p = 1 on ties: never worse than no clipping).
Candidates whose float16 scale would not be normal are skipped.

compressed-tensors `pack-quantized` (strategy "channel" = our channel_dim 0, "group" = our group, "tensor"): its
signed int8 value is q = c - o; its zero point is z = zp - o (asymmetric; 0 for symmetric); `weight_scale` holds s_st
(shape (m, 1), (m, G) or (1,)); `pack_to_int32` adds o back, so the unsigned b-bit integers in its `weight_packed`
words are exactly our codes c, row by row, and those in its packed `weight_zero_point` (channel/group) exactly our zp,
packed along the output dim (column by column); a tensor-wide zero point is stored unpacked as int8 z
(`export.compressed_tensors`, checked against compressed-tensors 0.20.1).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import constants as C
from ..dtypes import dtype_bits, dtype_from_name, dtype_name
from . import bitpack

INT_BITS = tuple(range(1, 9))
FLOAT_BITS = (16, 32)
ALLOWED_BITS = INT_BITS + FLOAT_BITS
GRANULARITIES = ("tensor", "channel", "group")
SCHEMES = ("minmax", "symmetric", "asymmetric")
SCALE_DTYPES = ("float32", "float16")
CLIPS = (None, "mse")
SCALE_BITS = 32  # minmax scale and zero are stored as float32

_FP16_MIN_NORMAL = 2.0**-14
_MSE_GRID, _MSE_STEPS, _MSE_NORM = 100, 80, 2.4  # shrink factors 1 - k / grid for k < steps; error sum |d|^norm
_MSE_BATCH_ELEMENTS = 1 << 22

__all__ = [
    "ALLOWED_BITS",
    "GRANULARITIES",
    "SCHEMES",
    "Grid",
    "QParams",
    "QuantSpec",
    "Quantized",
    "check_bits",
    "column_affine",
    "dequantize",
    "field_specs",
    "fit_grid",
    "fit_params",
    "from_fields",
    "grid_of",
    "quantize",
    "quantize_dequantize",
    "quantize_dequantize_spec",
    "quantize_spec",
    "quantize_with",
    "scales_representable",
    "stored_bits",
    "to_fields",
]


def check_bits(bits: int) -> int:
    """Return `bits` if it is an allowed width, else raise ValueError listing the allowed ones."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in ALLOWED_BITS:
        raise ValueError(f"bits={bits!r} is not supported; use one of 1-8 (integer codes), 16 (fp16/bf16) or 32 (fp32)")
    return bits


def _one_of(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"quantizer {name} {value!r} is unknown; use one of {', '.join(map(str, allowed))}")


@dataclass(frozen=True)
class QuantSpec:
    """How a 2-D matrix of `shape` is quantized. `channel_dim` is the dim whose entries each get a scale; `scheme`,
    `scale_dtype` and `clip` as in the module docstring (defaults: the published min-max quantizer)."""

    shape: tuple[int, int]
    bits: int
    granularity: str = "channel"
    channel_dim: int = 0
    group_size: int | None = None
    float_dtype: str | None = None  # "float16" | "bfloat16" | "float32" when bits >= 16
    scheme: str = "minmax"
    scale_dtype: str = "float32"
    clip: str | None = None

    def __post_init__(self) -> None:
        check_bits(self.bits)
        _one_of("granularity", self.granularity, GRANULARITIES)
        if self.granularity == "group" and (self.group_size is None or self.group_size < 1):
            raise ValueError("group granularity needs a positive group size (group_size, e.g. 128)")
        if self.channel_dim not in (0, 1):
            raise ValueError("channel_dim must be 0 (rows) or 1 (columns)")
        _one_of("scheme", self.scheme, SCHEMES)
        _one_of("scale dtype", self.scale_dtype, SCALE_DTYPES)
        _one_of("clip", self.clip, CLIPS)
        if self.scheme == "minmax" and (self.scale_dtype != "float32" or self.clip is not None):
            raise ValueError("the minmax scheme stores float32 scale and zero and does not clip; use scheme "
                             "'symmetric' or 'asymmetric' for float16 scales or clip='mse'")

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
                "channel_dim": self.channel_dim, "group_size": self.group_size, "float_dtype": self.float_dtype,
                "scheme": self.scheme, "scale_dtype": self.scale_dtype, "clip": self.clip}

    @classmethod
    def from_json(cls, d: dict) -> QuantSpec:
        """Inverse of `to_json`; JSON written before schemes existed loads as minmax with float32 scales."""
        return cls(shape=tuple(d["shape"]), bits=d["bits"], granularity=d["granularity"],
                   channel_dim=d["channel_dim"], group_size=d.get("group_size"), float_dtype=d.get("float_dtype"),
                   scheme=d.get("scheme", "minmax"), scale_dtype=d.get("scale_dtype", "float32"),
                   clip=d.get("clip"))


@dataclass
class QParams:
    """Quantization parameters as stored, each of the scale shape: `scale` (the spec's scale dtype), `zero`
    (minmax: float32 value of code 0) and `zero_point` (asymmetric: uint8 zero point zp in [0, 2**b - 1])."""

    scale: torch.Tensor
    zero: torch.Tensor | None = None
    zero_point: torch.Tensor | None = None

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> QParams:
        return QParams(*(None if t is None else fn(t) for t in (self.scale, self.zero, self.zero_point)))


@dataclass
class Quantized:
    """Integer codes (uint8, same shape as the input) with their parameters, or a float cast when bits >= 16."""

    spec: QuantSpec
    codes: torch.Tensor
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    zero_point: torch.Tensor | None = None

    @property
    def params(self) -> QParams:
        return QParams(self.scale, self.zero, self.zero_point)


@dataclass
class Grid:
    """A quantization grid in working precision, broadcast against the values it quantizes.

    `codes(x)` gives the codes as a fresh float tensor and `values_(t)` turns such a tensor into the quantized values
    in place, with exactly the operations `dequantize` uses. Encoding uses the stored parameters (for minmax: the
    unrounded float64 lo and scale of a float64 input, as the published quantizer always did).
    """

    scheme: str
    bits: int
    scale: torch.Tensor  # stored scale, in working precision
    enc_scale: torch.Tensor  # the scale codes are computed with
    shift: torch.Tensor | None  # minmax: lo to subtract; asymmetric: signed zero point z to add; symmetric: None
    zero: torch.Tensor | None  # minmax: stored lo, added when decoding
    base: torch.Tensor | int | None  # symmetric: o, asymmetric: zp, subtracted from codes when decoding

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Grid:
        """The same grid with `fn` applied to every parameter tensor (e.g. to select or reshape columns)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return Grid(**{k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in out.items()})

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Codes in [0, 2**b - 1] as a fresh float tensor of x's dtype."""
        o = 1 << (self.bits - 1)
        if self.scheme == "minmax":
            t = x - self.shift
            t.div_(self.enc_scale)
            return t.round_().clamp_(0, (1 << self.bits) - 1)
        t = x / self.enc_scale
        if self.shift is not None:
            t.add_(self.shift)
        return t.round_().clamp_(-o, o - 1).add_(o)

    def values_(self, t: torch.Tensor) -> torch.Tensor:
        """Decode float codes `t` in place: lo + c * s (minmax) or (c - base) * s."""
        if self.scheme == "minmax":
            return t.mul_(self.scale).add_(self.zero)
        return t.sub_(self.base).mul_(self.scale)


def _grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """View (m, n) as (m, G, g), padding the last group by repeating the row's last value. A group size above n is one
    group per row, viewed as (m, 1, n): padding it to the group size would only cost memory (64 x 1e8 floats for a
    64 x 128 matrix) for values that no parameter depends on (the max and min repeat, mse clipping masks them)."""
    m, n = x.shape
    group_size = min(group_size, max(n, 1))
    groups = math.ceil(n / group_size)
    pad = groups * group_size - n
    if pad:
        x = torch.cat([x, x[:, -1:].expand(m, pad)], dim=1)
    return x.reshape(m, groups, group_size)


def _view(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """x in the layout its parameters broadcast against: itself, or (m, G, g) groups (parameters (m, G, 1))."""
    return _grouped(x, spec.group_size) if spec.granularity == "group" else x


def _unview(t: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    return t.reshape(shape[0], -1)[:, : shape[1]]


def _padding_mask(v: torch.Tensor, n: int) -> torch.Tensor | None:
    """0/1 weights of the real entries of a grouped view of n columns (None when nothing is padded)."""
    pad = v.shape[1] * v.shape[2] - n if v.dim() == 3 else 0
    if not pad:
        return None
    mask = torch.ones(v.shape[1:], dtype=v.dtype, device=v.device)
    mask[-1, v.shape[2] - pad:] = 0
    return mask


def _reduce(v: torch.Tensor, spec: QuantSpec, op) -> torch.Tensor:
    """Reduce a view (with any leading batch dims) over each parameter group, keeping the parameters' shape."""
    if spec.granularity == "tensor":
        return op(v, dim=(-2, -1), keepdim=True)
    if spec.granularity == "channel":
        return op(v, dim=-1 if spec.channel_dim == 0 else -2, keepdim=True)
    return op(v, dim=-1, keepdim=True)


def _grid(p: QParams, spec: QuantSpec, dtype: torch.dtype) -> Grid:
    """The grid of stored parameters, in working precision `dtype`."""
    scale = p.scale.to(dtype)
    if spec.scheme == "minmax":
        zero = p.zero.to(dtype)
        return Grid(spec.scheme, spec.bits, scale, scale, zero, zero, None)
    if spec.scheme == "symmetric":
        return Grid(spec.scheme, spec.bits, scale, scale, None, None, 1 << (spec.bits - 1))
    zp = p.zero_point.to(dtype)
    return Grid(spec.scheme, spec.bits, scale, scale, zp - (1 << (spec.bits - 1)), None, zp)


def _step(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantization step (hi - lo) / (2**bits - 1), 1 where the range is empty (a constant group)."""
    scale = (hi - lo) / ((1 << bits) - 1)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _from_range(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> tuple[QParams, Grid]:
    """Stored parameters and grid of each group's range [lo, hi] (working precision = lo's dtype)."""
    levels = (1 << spec.bits) - 1
    if spec.scheme == "minmax":
        scale = _step(lo, hi, spec.bits)
        p = QParams(scale.float(), lo.float())
        grid = _grid(p, spec, lo.dtype)
        grid.enc_scale, grid.shift = scale, lo
        return p, grid
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    raw = torch.maximum(-lo, hi) / (levels / 2) if spec.scheme == "symmetric" else (hi - lo) / levels
    storage = dtype_from_name(spec.scale_dtype)
    empty = raw == 0
    raw = torch.where(empty, torch.finfo(storage).eps, raw.clamp(min=_smallest(storage)))
    p = QParams(raw.to(storage))
    if spec.scheme == "asymmetric":
        o = 1 << (spec.bits - 1)
        z = (-o - lo / raw).clamp_(-o, o - 1).round_().masked_fill_(empty, 0)
        p.zero_point = z.add_(o).to(torch.uint8)
    return p, _grid(p, spec, lo.dtype)


def _smallest(dtype: torch.dtype) -> float:
    """The smallest positive (subnormal) number of a float dtype: the floor of a non-empty group's scale, so that a
    stored scale is never 0 (a tiny group's step then exceeds its range: it decodes to within that step)."""
    return 2.0**-24 if dtype == torch.float16 else float(torch.finfo(dtype).tiny) * 2.0**-23


def _normal16(scale: torch.Tensor) -> torch.Tensor:
    """float16 can hold the scale: finite after the cast (subnormals included, which `_smallest` keeps above 0)."""
    return torch.isfinite(scale.to(torch.float16)) & (scale.abs() > 0)


_UNDERFLOW16 = 2.0**-16  # below it a float16 scale is a subnormal with fewer than 8 significant bits


def scales_representable(scale: torch.Tensor, spec: QuantSpec) -> bool:
    """False when `spec` stores float16 scales and one of `scale` overflows float16, or every one of a non-empty group
    (an empty group's scale is float16's epsilon) underflows it (below 2**-16) (one host sync)."""
    if spec.scale_dtype != "float16":
        return True
    real = scale.abs()[scale != torch.finfo(torch.float16).eps]
    return bool(_normal16(scale).all()) and (real.numel() == 0 or bool(real.max() >= _UNDERFLOW16))


def _mse_fit(v: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec,
             mask: torch.Tensor | None) -> tuple[QParams, Grid]:
    """The grid search of clip="mse" (module docstring): per group, the shrunk range with the least error. Candidates
    are evaluated a batch at a time (a leading dim), at most ~_MSE_BATCH_ELEMENTS values per temporary."""
    shrink = torch.tensor([1 - k / _MSE_GRID for k in range(_MSE_STEPS)], dtype=v.dtype, device=v.device)
    batch = max(1, _MSE_BATCH_ELEMENTS // max(1, v.numel()))
    best_lo = best_hi = best_err = None
    for k in range(0, _MSE_STEPS, batch):
        p = shrink[k:k + batch].reshape(-1, *([1] * v.dim()))
        c_lo, c_hi = lo * p, hi * p
        params, grid = _from_range(c_lo, c_hi, spec)
        d = grid.values_(grid.codes(v)).sub_(v).abs_().pow_(_MSE_NORM)
        if mask is not None:
            d.mul_(mask)
        err = _reduce(d, spec, torch.sum)
        if spec.scale_dtype == "float16":
            err = torch.where(_normal16(params.scale), err, torch.inf)
        err, first = err.min(dim=0)  # the first minimum of the batch
        first = first.unsqueeze(0)
        c_lo, c_hi = c_lo.gather(0, first).squeeze(0), c_hi.gather(0, first).squeeze(0)
        if best_err is None:
            best_lo, best_hi, best_err = c_lo, c_hi, err
            continue
        better = err < best_err  # strict: an earlier (wider) candidate wins ties
        best_err = torch.where(better, err, best_err)
        best_lo, best_hi = torch.where(better, c_lo, best_lo), torch.where(better, c_hi, best_hi)
    return _from_range(best_lo, best_hi, spec)


def _fit(v: torch.Tensor, spec: QuantSpec, n: int) -> tuple[QParams, Grid]:
    """Parameters of a view of an n-column matrix, in the view's broadcast shape."""
    lo, hi = _reduce(v, spec, torch.amin), _reduce(v, spec, torch.amax)
    if spec.clip == "mse":
        return _mse_fit(v, lo, hi, spec, _padding_mask(v, n))
    return _from_range(lo, hi, spec)


def _work_input(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def fit_grid(x: torch.Tensor, spec: QuantSpec) -> tuple[QParams, Grid]:
    """Stored parameters and working grid of the 2-D block `x` under spec's scheme and granularity (x's own shape:
    e.g. a group spec on a block of at most group_size columns gives one parameter set per row), both in the scale
    layout (rows x groups). float32 (float64 for float64 x). float16 scales are returned even when one is not a
    normal float16 number: check with `scales_representable`."""
    _check_matrix(x)
    if spec.bits in FLOAT_BITS:
        raise ValueError("16/32-bit specs are float casts and have no quantization parameters")
    spec = dataclasses.replace(spec, shape=tuple(x.shape))
    params, grid = _fit(_view(_work_input(x), spec), spec, x.shape[1])
    if spec.granularity == "group":
        params, grid = params.map(lambda t: t.squeeze(2)), grid.map(lambda t: t.squeeze(2))
    return params, grid


def fit_params(x: torch.Tensor, spec: QuantSpec) -> QParams:
    """The stored parameters of `fit_grid`."""
    return fit_grid(x, spec)[0]


def _float_dtype(x: torch.Tensor, bits: int) -> torch.dtype:
    if bits == 32:
        return torch.float32
    finite_max = torch.finfo(torch.float16).max
    return torch.float16 if x.abs().max() <= finite_max else torch.bfloat16


def _check_matrix(x: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"quantize expects a 2-D tensor, got shape {tuple(x.shape)}")


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _encoded(x: torch.Tensor, spec: QuantSpec, params: QParams, grid: Grid, v: torch.Tensor,
             dtype: torch.dtype | None) -> tuple[Quantized, torch.Tensor | None]:
    """Codes of the view `v` on `grid` (parameters `params` in the view's broadcast shape), and the decoded matrix in
    `dtype` (None: not wanted), decoded in the codes' float buffer."""
    t = grid.codes(v)
    if spec.granularity == "group":
        params = params.map(lambda p: p.squeeze(2))
    q = Quantized(spec, _unview(t, x.shape).to(torch.uint8), params.scale, params.zero, params.zero_point)
    if dtype is None:
        return q, None
    if t.dtype != _work_dtype(dtype):
        return q, dequantize(q, dtype)
    return q, _unview(grid.values_(t), x.shape).to(dtype)


def _quantize(x: torch.Tensor, spec: QuantSpec, dtype: torch.dtype | None) -> tuple[Quantized, torch.Tensor | None]:
    _check_matrix(x)
    if tuple(x.shape) != tuple(spec.shape):
        raise ValueError(f"matrix has shape {tuple(x.shape)} but its quantizer spec is for {tuple(spec.shape)}")
    if spec.bits in FLOAT_BITS:
        cast = _float_dtype(x, spec.bits)
        q = Quantized(dataclasses.replace(spec, float_dtype=dtype_name(cast)), x.to(cast))
        return q, None if dtype is None else q.codes.to(dtype)
    v = _view(_work_input(x), spec)
    params, grid = _fit(v, spec, x.shape[1])
    if not scales_representable(params.scale, spec):
        return _quantize(x, dataclasses.replace(spec, scale_dtype="float32"), dtype)
    return _encoded(x, spec, params, grid, v, dtype)


def quantize_spec(x: torch.Tensor, spec: QuantSpec) -> Quantized:
    """Quantize a 2-D float tensor as `spec` says (spec.shape must be x's). float32 (float64 inputs stay float64).
    The returned spec is what is stored: the float dtype chosen for 16 bits (float16 when every value fits, else
    bfloat16), and scale_dtype float32 where float16 scales were asked for but do not fit."""
    return _quantize(x, spec, None)[0]


def quantize_dequantize_spec(x: torch.Tensor, spec: QuantSpec, dtype: torch.dtype = torch.float32,
                             ) -> tuple[Quantized, torch.Tensor]:
    """`(q, dequantize(q, dtype))` for `q = quantize_spec(x, spec)`, bit for bit, reusing the codes' float buffer."""
    return _quantize(x, spec, dtype)


def grid_of(params: QParams, spec: QuantSpec, dtype: torch.dtype) -> Grid:
    """The working grid of stored parameters (scale layout, rows x groups), in working precision `dtype`: codes are
    computed against the stored values (as `quantize_with` does)."""
    return _grid(params, spec, dtype)


def quantize_with(x: torch.Tensor, params: QParams, spec: QuantSpec) -> Quantized:
    """Quantize x (spec.shape) with given stored parameters (of spec.scale_shape): codes against the stored values."""
    _check_matrix(x)
    xf = _work_input(x)
    view = params.map(lambda t: t.unsqueeze(2)) if spec.granularity == "group" else params
    return _encoded(x, spec, view, _grid(view, spec, xf.dtype), _view(xf, spec), None)[0]


def quantize(x: torch.Tensor, bits: int, granularity: str = "channel", channel_dim: int = 0,
             group_size: int | None = None) -> Quantized:
    """Quantize a 2-D float tensor with the published min-max quantizer. Computation is float32 (float64 inputs stay
    float64)."""
    _check_matrix(x)
    return quantize_spec(x, QuantSpec(tuple(x.shape), check_bits(bits), granularity, channel_dim, group_size))


def quantize_dequantize(x: torch.Tensor, bits: int, granularity: str = "channel", channel_dim: int = 0,
                        group_size: int | None = None, dtype: torch.dtype = torch.float32,
                        ) -> tuple[Quantized, torch.Tensor]:
    """`(q, dequantize(q, dtype))` for `q = quantize(x, ...)`, bit for bit, reusing the codes' float buffer.

    The dequantized matrix is formed with the stored (float32) scale and zero, in the same operations as
    `dequantize`, so it is exactly what a loader reconstructs from the packed codes.
    """
    _check_matrix(x)
    spec = QuantSpec(tuple(x.shape), check_bits(bits), granularity, channel_dim, group_size)
    return quantize_dequantize_spec(x, spec, dtype)


def dequantize(q: Quantized, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reconstruct the float matrix from a `Quantized` (float32 arithmetic, float64 when dtype is float64)."""
    spec = q.spec
    if spec.bits in FLOAT_BITS:
        return q.codes.to(dtype)
    work = _work_dtype(dtype)
    params = q.params.map(lambda t: t.unsqueeze(2)) if spec.granularity == "group" else q.params
    t = _view(q.codes.to(work), spec)
    return _unview(_grid(params, spec, work).values_(t), spec.shape).to(dtype)


def column_affine(q: Quantized) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(s, z), float64 vectors over the columns, with `dequantize(q)` = codes * s + z column by column (each entry
    up to the rounding of dequantize's working precision), when q holds integer codes with one parameter set per
    column (granularity channel, channel_dim 1) or per tensor; None for float casts, rows and groups."""
    spec = q.spec
    per_column = spec.granularity == "channel" and spec.channel_dim == 1
    if spec.bits in FLOAT_BITS or not (per_column or spec.granularity == "tensor"):
        return None
    n = spec.shape[1]
    s = q.scale.double().reshape(-1).expand(n)
    if spec.scheme == "minmax":
        z = q.zero.double().reshape(-1).expand(n)
    elif spec.scheme == "symmetric":
        z = -(1 << (spec.bits - 1)) * s
    else:
        z = -q.zero_point.double().reshape(-1).expand(n) * s
    return s.contiguous(), z.contiguous()


def field_specs(spec: QuantSpec, float_dtype: str = "float16") -> dict[str, tuple[str, tuple[int, ...]]]:
    """Field name -> (dtype name, shape) of what `to_fields` stores, without computing anything."""
    m, n = spec.shape
    if spec.bits in FLOAT_BITS:
        return {C.FIELD_FLOAT: (spec.float_dtype or ("float32" if spec.bits == 32 else float_dtype), (m, n))}
    out = {C.FIELD_PACKED: ("uint8", (bitpack.packed_nbytes(m * n, spec.bits),)),
           C.FIELD_SCALE: (spec.scale_dtype, spec.scale_shape)}
    if spec.scheme == "minmax":
        out[C.FIELD_ZERO] = ("float32", spec.scale_shape)
    elif spec.scheme == "asymmetric":
        out[C.FIELD_ZERO_POINT] = ("uint8", (bitpack.packed_nbytes(math.prod(spec.scale_shape), spec.bits),))
    return out


def stored_bits(spec: QuantSpec) -> int:
    """Exact bits a quantized matrix occupies on disk: packed codes (whole bytes), scales, zeros or zero points."""
    return sum(math.prod(shape) * dtype_bits(dtype_from_name(dtype)) for dtype, shape in field_specs(spec).values())


def to_fields(q: Quantized) -> dict[str, torch.Tensor]:
    """Tensors to store (names from `constants`): the float matrix for 16/32 bits, else packed codes and scales,
    plus float32 zeros (minmax) or bit-packed zero points (asymmetric)."""
    if q.spec.bits in FLOAT_BITS:
        return {C.FIELD_FLOAT: q.codes.contiguous()}
    # Codes of a `Quantized` are in range by construction (clamped by `quantize`, masked by `unpack`).
    out = {C.FIELD_PACKED: bitpack.pack(q.codes, q.spec.bits, check=False), C.FIELD_SCALE: q.scale.contiguous()}
    if q.spec.scheme == "minmax":
        out[C.FIELD_ZERO] = q.zero.contiguous()
    elif q.spec.scheme == "asymmetric":
        out[C.FIELD_ZERO_POINT] = bitpack.pack(q.zero_point, q.spec.bits, check=False)
    return out


def _checked_field(fields: dict[str, torch.Tensor], name: str, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    if name not in fields:
        raise ValueError(f"stored quantized matrix lacks its '{name}' tensor")
    t = fields[name]
    if name == C.FIELD_PACKED or name == C.FIELD_ZERO_POINT:
        if t.dtype != torch.uint8:
            raise ValueError(f"stored '{name}' has dtype {t.dtype}, expected uint8")
        return t  # its byte count is checked by unpack
    if tuple(t.shape) != shape:
        raise ValueError(f"stored scales have shape {tuple(t.shape)}, expected {shape}")
    if dtype_name(t.dtype) != dtype:
        raise ValueError(f"stored '{name}' has dtype {t.dtype}, expected {dtype}")
    return t


def from_fields(fields: dict[str, torch.Tensor], spec: QuantSpec) -> Quantized:
    """Inverse of `to_fields`; raises ValueError when a field is missing or has the wrong shape or dtype."""
    m, n = spec.shape
    if spec.bits in FLOAT_BITS:
        values = fields[C.FIELD_FLOAT]
        if tuple(values.shape) != (m, n):
            raise ValueError(f"stored matrix has shape {tuple(values.shape)}, expected {(m, n)}")
        return Quantized(spec, values)
    got = {name: _checked_field(fields, name, dtype, shape) for name, (dtype, shape) in field_specs(spec).items()}
    codes = bitpack.unpack(got[C.FIELD_PACKED], spec.bits, m * n).reshape(m, n)
    zero_point = got.get(C.FIELD_ZERO_POINT)
    if zero_point is not None:
        zero_point = bitpack.unpack(zero_point, spec.bits, math.prod(spec.scale_shape)).reshape(spec.scale_shape)
    return Quantized(spec, codes, got[C.FIELD_SCALE], got.get(C.FIELD_ZERO), zero_point)
