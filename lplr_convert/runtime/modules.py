"""Runtime modules that keep a conversion's stored bits in memory and compute from them.

`PackedMatrix` holds one stored matrix (a `QuantPart`'s fields: bit-packed codes, scales, zeros or zero points, or a
16/32-bit float matrix) as buffers and multiplies by it through a kernel (`kernels`) chosen for its layout and
device; `PackedLinear` is a linear layer y = Q x + L (R x) + b made of such matrices (`PackedLayout`: rtn/gptq Q x,
lplr/lsvd/dsvd L (R x), qlr both; with an incoherence transform y = U^T (Q' + L' R') V x + b, the transforms applied
to the activations), never forming the dense weight in forward.

Kernels (`KERNELS`; `LPLR_KERNEL=name` or `load_model(..., kernel=name)` overrides the automatic choice):
- "tiled": dequantize a tile of rows at a time (a few MiB) in the activation dtype and multiply; any width, scheme,
  granularity and device. Codes stay in the stored flat packing.
- "int4pack": 4-bit codes in the int4pack layout of the device (the same bytes). On the CPU, bfloat16/float16 inputs
  of up to `INT4PACK_MAX_TOKENS` rows run torch's `_weight_int4pack_mm_for_cpu`; float32 inputs and longer ones run
  the tiled path over the same codes (measured faster there: scripts/bench_kernels.py). On CUDA, bfloat16 modules
  run `_weight_int4pack_mm` (tinygemm) for every input (cast to bfloat16, the kernel's only dtype), where the
  device passed `kernels.int4pack_check` (else tiled). In a bfloat16/float16 model the kernel
  may hold its scales-and-zeros in that dtype in place of the stored scales and zero points (forming them at each
  call took half of the kernel's time; their dtype rounds the scales: bfloat16 keeps 8 significant bits), and thin
  low-rank factors padded to its shapes (rows to 16, columns to 32): `_plan_many` spends at most
  `INT4PACK_CACHE_OVERHEAD` of the stored bytes on both, over one layer, or over the whole model (`balance`).
- "int8pack": 8-bit codes per row or tensor as int8 (the same bytes); inputs of up to `INT8PACK_MAX_TOKENS` rows
  run `_weight_int8pack_mm` (+ the zero point as a per-row offset times sum(x); bfloat16 inputs in float32: its
  bfloat16 path is wrong in torch 2.13), longer ones the tiled path.
A kernel that cannot run a matrix falls back to "tiled" with a warning; moving a module to another device (`.to()`,
`.cuda()`) puts the codes back in the stored packing where they are and chooses again on the new device; a dtype
cast changes the activation dtype only (the stored scales keep their dtype).
"""

from __future__ import annotations

import functools
import os
from collections import Counter
from collections.abc import Iterable, Mapping

import torch
from loguru import logger
from torch import nn

from .. import constants as C
from ..errors import LplrError
from ..math import bitpack
from ..math import quantize as qz
from ..methods.base import PackedLayout
from . import kernels as K

__all__ = ["ENV_KERNEL", "KERNELS", "PackedLinear", "PackedMatrix", "balance", "check_kernel", "check_parts", "kernel_counts",
           "log_kernel_counts"]

ENV_KERNEL = "LPLR_KERNEL"
KERNELS = ("auto", "tiled", "int4pack", "int8pack")
INT4PACK_MAX_TOKENS = 32
INT8PACK_MAX_TOKENS = 4
INT4PACK_CACHE_OVERHEAD = 0.05  # int4pack layouts hold <= (1 + this) x the stored bytes of the matrices planned together

_BUFFER = {C.FIELD_PACKED: "packed", C.FIELD_SCALE: "scale", C.FIELD_ZERO: "zero", C.FIELD_ZERO_POINT: "zero_point",
           C.FIELD_FLOAT: "values"}
_FIELD = {v: k for k, v in _BUFFER.items()}


def check_kernel(name: str | None) -> str:
    """The kernel asked for (argument, else $LPLR_KERNEL, else "auto"); an unknown name is a one-line LplrError."""
    name = name or os.environ.get(ENV_KERNEL) or "auto"
    if name not in KERNELS:
        raise LplrError(f"kernel {name!r} is unknown; use one of {', '.join(KERNELS)} (argument kernel= or "
                        f"${ENV_KERNEL})")
    return name


def _runs(kernel: str, spec: qz.QuantSpec, transpose: bool, device: torch.device, pad: bool = False,
          dtype: torch.dtype | None = None) -> bool:
    if kernel == "tiled":
        return True
    if not transpose:
        return False
    if kernel == "int4pack":
        if device.type == "cuda" and dtype != torch.bfloat16:
            return False  # the CUDA kernel multiplies bfloat16 only
        return K.int4pack_segments(spec, pad) is not None and K.int4pack_available(device)
    if device.type != "cpu":
        return False
    if kernel == "int8pack":
        return spec.bits == 8 and (spec.granularity == "tensor" or (spec.granularity == "channel" and
                                                                      spec.channel_dim == 0))
    return False


def _choose(asked: str, spec: qz.QuantSpec, transpose: bool, device: torch.device, where: str,
            dtype: torch.dtype | None = None, pad: bool = False, quiet: bool = False) -> str:
    """The kernel for one matrix: the one asked for where it can run it (else a warning and the automatic choice);
    automatically, the kernel that is faster than the tiled path for decode-sized inputs of the model's dtype
    `dtype` (measured on the CPU, scripts/bench_kernels.py): int4pack for bfloat16/float16 (its float32 path is
    slower than the tiled one; on CUDA bfloat16 only), int8pack for 8-bit per-row matrices on the CPU (bfloat16
    inputs run its float32 path: its bfloat16 path is wrong in torch 2.13), else tiled."""
    if asked != "auto":
        if _runs(asked, spec, transpose, device, pad, dtype):
            return asked
        if not quiet:
            logger.warning(f"kernel {asked} cannot run {where} ({spec.bits}-bit {spec.granularity}, {tuple(spec.shape)} "
                       f"on {device.type}); using the automatic choice")
    if dtype != torch.float32 and _runs("int4pack", spec, transpose, device, pad, dtype):
        return "int4pack"
    if _runs("int8pack", spec, transpose, device):
        return "int8pack"
    return "tiled"


_Plan = dict[str, tuple[bool, bool]]
_NAMES = ("backbone", "left", "right")


def _int4pack_runs(part, pad: bool, asked: str, transpose: bool, device: torch.device, dtype: torch.dtype) -> bool:
    return part is not None and _choose(asked, part.spec, transpose, device, "", dtype, pad, quiet=True) == "int4pack"


def _int4pack_extra(part, pad: bool, dtype: torch.dtype) -> float:
    """Bytes the int4pack layout with cached scales holds beyond the part's stored bytes."""
    return K.int4pack_bytes(part.spec, K.int4pack_segments(part.spec, pad), dtype) - qz.stored_bits(part.spec) / 8


def _plan_many(layers: list[tuple[PackedLayout, bool, str, torch.device, torch.dtype]],
               overhead: float | None = None) -> list[_Plan]:
    """(pad, cache) of each matrix of each layer (layout, transpose, kernel asked, device, dtype): what the int4pack
    kernel may hold beyond the stored bytes, at most `overhead` of all these layers' stored bytes, spent in order of
    the time it saves per byte (measured, quiet, 2 threads): low-rank factors padded to the kernel's shapes with
    cached scales-and-zeros (17 us a call for a 27 x 576 factor against 110-150 us on the tiled path), then the
    backbones' cached scales-and-zeros (forming them at each call was half of the kernel's time), then unpadded
    factors' cached scales-and-zeros; cheapest first within each. Decided from the specs alone, so a meta-device twin
    is planned the same."""
    overhead = INT4PACK_CACHE_OVERHEAD if overhead is None else overhead
    plans: list[_Plan] = [{k: (False, False) for k in _NAMES} for _ in layers]
    budget = 0.0
    candidates = []  # (tier, extra bytes, layer, what)
    for i, (layout, transpose, asked, device, dtype) in enumerate(layers):
        parts = dict(zip(_NAMES, (layout.backbone, layout.left, layout.right)))
        budget += overhead * sum(qz.stored_bits(p.spec) / 8 for p in parts.values() if p is not None)
        if dtype not in (torch.bfloat16, torch.float16) or device.type not in ("cpu", "cuda") or not transpose:
            continue
        int4 = functools.partial(_int4pack_runs, asked=asked, transpose=transpose, device=device, dtype=dtype)
        cost = functools.partial(_int4pack_extra, dtype=dtype)
        factors = tuple(k for k in ("left", "right") if parts[k] is not None)
        if factors and all(int4(parts[k], True) for k in factors):
            candidates.append((0, sum(cost(parts[k], True) for k in factors), i, factors))
        if int4(parts["backbone"], False):
            candidates.append((1, cost(parts["backbone"], False), i, ("backbone",)))
        candidates += [(2, cost(parts[k], False), i, (k,)) for k in factors if int4(parts[k], False)]
    for tier, extra, i, what in sorted(candidates, key=lambda c: c[:3]):
        if tier == 2 and plans[i][what[0]][0] or extra > budget:
            continue  # a factor already padded, or over the budget
        plans[i].update({k: (tier == 0, True) for k in what})
        budget -= extra
    return plans


def balance(model: nn.Module, overhead: float | None = None) -> None:
    """Plan every `PackedLinear` of `model` together (`_plan_many`: one budget of `overhead` x the stored bytes of
    all of them, which layers without factors leave to those with) and lay each matrix out as planned. The loaders
    call it once the model is loaded; a layer built alone is planned alone."""
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    for layer, plan in zip(layers, _plan_many([layer.planning() for layer in layers], overhead)):
        layer.replan(plan)


def _target(fn, device: torch.device) -> tuple[torch.device, torch.dtype | None]:
    """Where `Module._apply`'s `fn` puts tensors, and the float dtype it casts them to (None: it keeps float dtypes),
    from a float64 probe."""
    probe = fn(torch.zeros((), dtype=torch.float64, device=device))
    return probe.device, None if probe.dtype == torch.float64 else probe.dtype


class PackedMatrix(nn.Module):
    """One stored matrix M (m x n) kept as stored (codes bit-packed, scales, zeros or zero points; a float matrix as
    is), or with its codes in a kernel's layout of the same bytes. `forward(x)` is x @ M^T (`transpose`, x: (t, n))
    or x @ M (x: (t, m)) for 2-D x; no more than one tile of the dense M exists at a time."""

    def __init__(self, spec: qz.QuantSpec, fields: Mapping[str, torch.Tensor], transpose: bool = True,
                 kernel: str | None = None, where: str = "", dtype: torch.dtype | None = None, pad: bool = False,
                 cache: bool = False, plan_device: torch.device | str | None = None):
        """`plan_device`: choose the kernel and lay the codes out for that device (default: where `fields` are),
        e.g. as a meta twin planned there was (from_pretrained); `balance` settles them where they are."""
        super().__init__()
        self.spec, self.transpose, self.where, self.dtype = spec, transpose, where, dtype
        self.pad, self.cache, self.asked = pad, cache, check_kernel(kernel)
        self.kernel, self.cached = "tiled", False
        self.layout = None  # the device layout ("cpu", "cuda") int4pack's codes are held in
        for field, t in fields.items():
            self.register_buffer(_BUFFER[field], t)
        self.segments = None
        device = next(iter(fields.values())).device
        if device.type != "meta":
            plan = device if plan_device is None else torch.device(plan_device)
            self._relayout(_choose(self.asked, spec, transpose, plan, where, dtype, pad), device=plan)

    @classmethod
    def meta(cls, spec: qz.QuantSpec, transpose: bool = True, kernel: str | None = None, where: str = "",
             device: torch.device | str = "cpu", dtype: torch.dtype | None = None, pad: bool = False,
             cache: bool = False) -> PackedMatrix:
        """The module as it will be loaded on `device` (same buffer names, shapes and dtypes), on the meta device."""
        fields = {f: torch.empty(shape, dtype=getattr(torch, dtype), device="meta")
                  for f, (dtype, shape) in qz.field_specs(spec, spec.float_dtype or "float16").items()}
        mod = cls(spec, fields, transpose, kernel=kernel, where=where, dtype=dtype, pad=pad, cache=cache)
        kernel = _choose(mod.asked, spec, transpose, torch.device(device), where, dtype, pad)
        mod._relayout(kernel, meta=True, device=device)
        return mod

    # --- stored form and kernel layouts ------------------------------------------------------------------------
    def _field(self, field: str) -> torch.Tensor | None:
        return self._buffers.get(_BUFFER[field])

    def fields(self) -> dict[str, torch.Tensor]:
        """The parameters as stored (scales, zeros, zero points; a float matrix), without the codes (from the cached
        scales-and-zeros where the int4pack kernel holds them: `kernels.int4pack_fields`)."""
        if self.cached:
            return K.int4pack_fields(self.spec, self._scales_zeros(), self.segments)
        return {f: t for name, t in self._buffers.items()
                if (f := _FIELD.get(name)) is not None and t is not None and f != C.FIELD_PACKED}

    def stored(self) -> dict[str, torch.Tensor]:
        """Every field exactly as stored (the codes back in the flat packing)."""
        out = self.fields()
        if self.spec.bits not in qz.FLOAT_BITS and C.FIELD_PACKED not in out:
            out[C.FIELD_PACKED] = self._packed()
        return out

    def _packed(self) -> torch.Tensor:
        if self.kernel == "int4pack" and self.layout == "cuda":
            return bitpack.pack(self._kernel_codes().reshape(-1), 4, check=False)
        if self.kernel == "int4pack":
            return K.int4pack_packed(self._kernel_weights(), self.spec)
        if self.kernel == "int8pack":
            return K.int8pack_codes(self._buffers["int8"], 0, self.spec.shape[0]).reshape(-1).clone()
        return self._buffers["packed"]

    def _kernel_weights(self) -> list[torch.Tensor]:
        return [self._buffers[f"int4pack_{i}"] for i in range(len(self.segments))]

    def _kernel_codes(self) -> torch.Tensor:
        """All codes (m, n) of a CUDA layout, read through its kernel (it must run where the buffers are)."""
        weights = self._kernel_weights()
        if K.int4pack_layout(weights[0].device) != self.layout:
            raise LplrError(f"{self.where or 'a packed matrix'}: its codes are in the {self.layout} int4pack layout "
                            f"but sit on {weights[0].device}; move the model with .to() (which converts them)")
        return K.int4pack_kernel_codes(K.int4pack_mm(weights[0].device), weights, self.segments, *self.spec.shape)

    def _scales_zeros(self) -> list[torch.Tensor]:
        return [self._buffers[f"int4pack_sz_{i}"] for i in range(len(self.segments))]

    def _caches(self) -> bool:
        """Hold int4pack's scales-and-zeros in the module's dtype: a bfloat16/float16 module whose plan
        (`_plan_many`) says so."""
        return self.cache and self.dtype in (torch.bfloat16, torch.float16)

    def set_kernel(self, kernel: str) -> None:
        """Hold the codes in `kernel`'s layout (from whichever layout they are in now)."""
        self._relayout(kernel)

    def _relayout(self, kernel: str, meta: bool = False, device: torch.device | str | None = None) -> None:
        if kernel == self.kernel:
            return
        if not meta and self.kernel != "tiled":  # back to the flat packing (and the stored parameters) first
            packed, fields = self._packed(), self.fields()
            for name in [n for n in self._buffers if n.startswith("int4pack_") or n == "int8"]:
                del self._buffers[name]
            if self.cached:
                for field, t in fields.items():
                    self.register_buffer(_BUFFER[field], t)
            self.register_buffer("packed", packed)
            self.kernel, self.segments, self.cached, self.layout = "tiled", None, False, None
        if kernel == "tiled":
            return
        packed = self._buffers.pop("packed")
        if kernel == "int4pack":
            self.segments = K.int4pack_segments(self.spec, self.pad)
            self.layout = K.int4pack_layout(device if device is not None else packed.device)
            m = -(-self.spec.shape[0] // 16) * 16  # rows padded to 16 (`pad`)
            if meta and self.layout == "cuda":
                weights = [torch.empty(K.int4pack_cuda_shape(m, b - a), dtype=torch.int32, device="meta")
                           for a, b, _ in self.segments]
            elif meta:
                weights = [torch.empty(m, (b - a) // 2, dtype=torch.uint8, device="meta") for a, b, _ in self.segments]
            else:
                weights = K.int4pack_weight(packed, self.spec, self.segments, self.layout)
            for i, w in enumerate(weights):
                self.register_buffer(f"int4pack_{i}", w)
            if self._caches():
                sz = ([torch.empty((b - a) // g, m, 2, dtype=self.dtype, device="meta") for a, b, g in self.segments]
                      if meta else K.int4pack_scales_zeros(self.spec, self.fields(), self.segments, self.dtype))
                for field in self.fields():
                    del self._buffers[_BUFFER[field]]
                for i, t in enumerate(sz):
                    self.register_buffer(f"int4pack_sz_{i}", t)
                self.cached = True
        else:
            self.register_buffer("int8", torch.empty(self.spec.shape, dtype=torch.int8, device="meta") if meta
                                 else K.int8pack_weight(packed, self.spec))
        self.kernel = kernel

    def values_device(self) -> torch.device:
        return next(iter(self._buffers.values())).device

    def _apply(self, fn, recurse=True):
        """`.to()`, `.cuda()`, `.cpu()`, dtype casts: the codes go back to the stored packing where they are (a
        device's layout is read there), move, and the kernel is chosen again on the new device; a cast to another
        float dtype changes the activation dtype only (stored scales keep their dtype, cached scales-and-zeros are
        formed again)."""
        old = self.values_device()
        device, dtype = _target(fn, old)
        if old.type == "meta" or (device == old and dtype is None):
            return super()._apply(fn, recurse)
        if self.kernel != "tiled" and (device != old or self.cached):
            self.set_kernel("tiled")
        for name, t in self._buffers.items():
            if t is not None:
                self._buffers[name] = t.to(device) if dtype is not None else fn(t)
        if dtype is not None:
            self.dtype = dtype
        if device.type != "meta":
            self.set_kernel(_choose(self.asked, self.spec, self.transpose, device, self.where, self.dtype, self.pad,
                                    quiet=True))
        return self

    # --- computing ------------------------------------------------------------------------------------------------
    def _codes(self):
        if self.kernel == "int4pack" and self.layout == "cuda":
            codes = self._kernel_codes()
            return (lambda i, j: codes[i:j]), 8
        if self.kernel == "int4pack":
            weights = self._kernel_weights()
            return (lambda i, j: K.int4pack_codes(weights, i, j, self.spec.shape[1])), 64
        if self.kernel == "int8pack":
            w = self._buffers["int8"]
            return (lambda i, j: K.int8pack_codes(w, i, j)), 8
        return None, 8

    def _settled(self, device: torch.device) -> bool:
        """The codes sit on `device` in the layout its kernel reads."""
        on = self.values_device()
        if on != device:
            return False
        if self.kernel == "int4pack":
            return K.int4pack_layout(on) == self.layout
        return self.kernel == "tiled" or on.type == "cpu"  # int8pack: a CPU kernel

    def _int4pack_args(self) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """The kernel's weights and cached scales-and-zeros, listed once per set of buffers (decode calls this per
        token and matrix: 210 times a token on SmolLM2)."""
        w0, sz0 = self._buffers["int4pack_0"], self._buffers.get("int4pack_sz_0")
        got = self.__dict__.get("_args")
        if got is None or got[0] is not w0 or got[1] is not sz0:
            got = (w0, sz0, self._kernel_weights(), self._scales_zeros() if self.cached else None)
            self.__dict__["_args"] = got
        return got[2], got[3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        kernel = self.kernel
        if kernel != "tiled" and not self._settled(x.device):
            # placed on another device without `.to()` (offloading hooks that swap the buffers; from_pretrained
            # before `balance`): the codes are read from the layout as they are (the CPU layouts with tensor ops on
            # any device), on the tiled path
            kernel = "tiled"
        elif kernel == "int4pack" and self.layout == "cuda":  # every input, in bfloat16 (the kernel's only dtype)
            weights, sz = self._int4pack_args()
            if sz is None or sz[0].dtype != torch.bfloat16:
                sz = K.int4pack_scales_zeros(spec, self.fields(), self.segments, torch.bfloat16)
            return K.int4pack_linear(x.to(torch.bfloat16), weights, self.segments, sz, spec.shape[0]).to(x.dtype)
        if kernel == "int4pack" and x.dtype != torch.float32 and x.shape[0] <= INT4PACK_MAX_TOKENS:
            weights, sz = self._int4pack_args()
            if sz is None or sz[0].dtype != x.dtype:
                sz = K.int4pack_scales_zeros(spec, self.fields(), self.segments, x.dtype)
            return K.int4pack_linear(x, weights, self.segments, sz, spec.shape[0])
        if kernel == "int8pack" and x.shape[0] <= INT8PACK_MAX_TOKENS:
            # bfloat16 inputs in float32: torch 2.13's bfloat16 int8pack path is wrong on this CPU
            xk = x.float() if x.dtype == torch.bfloat16 else x
            fields = self.fields()
            y = K.int8pack_linear(xk, self._buffers["int8"], fields[C.FIELD_SCALE], K.int8pack_offset(spec, fields))
            return y.to(x.dtype)
        rows, align = self._codes()
        return K.tiled_matmul(x, spec, self.fields() if rows else self.stored(), self.transpose, rows=rows,
                              align=align)

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """M (m x n) decoded whole, as `math.quantize.dequantize` decodes the stored fields (formed on request)."""
        rows, _ = self._codes()
        m = self.spec.shape[0]
        return K.dequantize_rows(self.spec, self.fields() if rows else self.stored(), 0, m, dtype,
                                 None if rows is None else rows(0, m))

    def extra_repr(self) -> str:
        s = self.spec
        kind = f"float{s.bits}" if s.bits in qz.FLOAT_BITS else f"{s.bits}-bit {s.scheme} {s.granularity}" + (
            f" {s.group_size}" if s.granularity == "group" else "")
        return f"{tuple(s.shape)}, {kind}, kernel={self.kernel}" + (
            f", scales-and-zeros held in {str(self.dtype).removeprefix('torch.')}" if self.cached else "")


class PackedLinear(nn.Module):
    """A linear layer computed from stored matrices: y = Q x + L (R x) + b (W = Q + L R as `PackedLayout` says;
    rtn/gptq: Q x; lplr/lsvd/dsvd: L (R x), two thin products; qlr: both). `conv1d` marks matrices stored in
    transformers Conv1D orientation (in x out: W^T = Q + L R, so y = x Q + (x L) R). Inputs of any batch shape and
    float dtype; outputs in the input's dtype.

    `weight` is the dense (out x in) weight formed on every access, for code that reads `module.weight`; forward never
    forms it (`to_dense()` is the explicit spelling)."""

    def __init__(self, layout: PackedLayout, parts: Mapping[str, torch.Tensor] | None, bias: torch.Tensor | None = None,
                 conv1d: bool = False, kernel: str | None = None, where: str = "", device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, plan_device: torch.device | str | None = None):
        """`parts` None: the meta twin planned for `device`. `plan_device`: plan and lay the matrices out for that
        device whatever device the parts are on (as their meta twin was; `balance` settles them later)."""
        super().__init__()
        self.conv1d, self.dtype = conv1d, dtype
        rows, cols = layout.shape
        self.out_features, self.in_features = (cols, rows) if conv1d else (rows, cols)
        self.rank = layout.rank
        self.transform = layout.transform  # incoherence (math.hadamard.Incoherence) or None; computed from its seed

        self.layout, self.asked = layout, check_kernel(kernel)
        on = torch.device(device) if parts is None else next(iter(parts.values())).device
        on = on if plan_device is None else torch.device(plan_device)
        plan = _plan_many([(layout, not conv1d, self.asked, on, dtype)])[0]

        def make(name, part):
            if part is None:
                return None
            pad, cache = plan[name]
            if parts is None:
                return PackedMatrix.meta(part.spec, not conv1d, kernel, where, device, dtype, pad, cache)
            return PackedMatrix(part.spec, part.fields(parts), not conv1d, kernel, where, dtype, pad, cache, on)

        self.backbone = make("backbone", layout.backbone)
        # y = L (R x): R first; in Conv1D orientation x L first
        self.left, self.right = make("left", layout.left), make("right", layout.right)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def _apply(self, fn, recurse=True):
        """A cast to another float dtype makes it the activation dtype (the matrices keep their stored dtypes)."""
        some = next(self.buffers(), None)
        if some is not None and some.device.type != "meta":
            dtype = _target(fn, some.device)[1]
            self.dtype = self.dtype if dtype is None else dtype
        return super()._apply(fn, recurse)

    def _matrices(self) -> dict[str, PackedMatrix]:
        return {k: m for k in _NAMES if (m := getattr(self, k)) is not None}

    def planning(self) -> tuple[PackedLayout, bool, str, torch.device, torch.dtype]:
        """What `_plan_many` plans this layer from."""
        device = next(iter(self._matrices().values())).values_device()
        return self.layout, not self.conv1d, self.asked, device, self.dtype

    def replan(self, plan: _Plan) -> None:
        """Lay each matrix out as `plan` says ((pad, cache) per matrix) for the device it is on, the kernel chosen
        again."""
        _, transpose, asked, device, dtype = self.planning()
        for name, mat in self._matrices().items():
            want = _choose(asked, mat.spec, transpose, device, mat.where, dtype, plan[name][0], quiet=True)
            if (mat.pad, mat.cache) != plan[name] or want != mat.kernel or not mat._settled(device):
                mat.set_kernel("tiled")
                mat.pad, mat.cache = plan[name]
                mat.set_kernel(want)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = self._rotated_inputs(x.reshape(-1, shape[-1]))
        bias = self.bias if self.transform is None else None  # else added after the output transform
        y = None
        if self.left is not None:
            first, second = (self.left, self.right) if self.conv1d else (self.right, self.left)
            y = second(first(x2))
            if bias is not None:
                y = y + bias.to(y.dtype)
        if self.backbone is not None:
            q = self.backbone(x2)
            y = (q if bias is None else q + bias.to(q.dtype)) if y is None else y + q
        if self.transform is not None:
            y = self._restored_outputs(y)
            y = y if self.bias is None else y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    # With an incoherence transform (`PackedLayout.transform`) the stored matrices make W' = U W V^T, so
    # y = U^T (W' (V x)): V on the inputs before the packed products, U^T on their outputs after, on the fly (a few
    # small batched matmuls per row, `math.hadamard`), in float32 for half-precision activations. In Conv1D
    # orientation the stored M' is (in x out) and y = ((x U^T) M') V: U first, V^T after.
    def _rotated_inputs(self, x: torch.Tensor) -> torch.Tensor:
        T = self.transform
        if T is None:
            return x
        side = T.out if self.conv1d else T.inp
        return side.apply(x.float()).to(x.dtype)

    def _restored_outputs(self, y: torch.Tensor) -> torch.Tensor:
        T = self.transform
        side = T.inp if self.conv1d else T.out
        return side.apply_t(y.float()).to(y.dtype)

    def to_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense (out x in) weight Q + L R, decoded as the loaders decode it (formed on request; with an
        incoherence transform U^T Q' V + (U^T L')(R' V), as the methods' `decode` forms it)."""
        from ..math.lowrank import product

        T = self.transform
        base = None if self.backbone is None else self.backbone.dense()
        if T is not None and base is not None:
            base = T.restore(base)
        if self.left is not None:
            L, R = self.left.dense(), self.right.dense()
            if T is not None:
                L, R = T.restore_left(L), T.restore_right(R)
            W = product(L, R, base)
        else:
            W = base
        return (W.T if self.conv1d else W).to(dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight (out x in) in the dtype the model was loaded in, formed on every access (never by
        forward)."""
        some = next(self.buffers())
        if some.device.type == "meta":
            return torch.empty(self.out_features, self.in_features, dtype=self.dtype, device="meta")
        return self.to_dense(self.dtype)

    @property
    def kernels(self) -> list[str]:
        return [m.kernel for m in (self.backbone, self.right, self.left) if m is not None]

    def extra_repr(self) -> str:
        parts = []
        if self.backbone is not None:
            parts.append(f"Q {self.backbone.spec.bits}-bit")
        if self.left is not None:
            parts.append(f"rank={self.rank} (L {self.left.spec.bits}-bit, R {self.right.spec.bits}-bit)")
        if self.transform is not None:
            parts.append(f"incoherence={self.transform.kind}")
        return (f"in_features={self.in_features}, out_features={self.out_features}, {', '.join(parts)}, "
                f"bias={self.bias is not None}, kernel={'+'.join(dict.fromkeys(self.kernels))}")


def check_parts(name: str, layout: PackedLayout, parts: Mapping[str, torch.Tensor]) -> None:
    """Every stored field of `layout` present among `parts` with the dtype and shape its spec gives (the packed codes
    and zero points with the byte count of their width): a one-line LplrError naming the tensor otherwise."""
    for part in (layout.backbone, layout.left, layout.right):
        if part is None:
            continue
        got = part.fields(parts)
        spec = part.spec
        want = qz.field_specs(spec, spec.float_dtype or "float16")
        for field, (dtype, shape) in want.items():
            full = f"{name}.{part.part}" + (f".{field}" if field else "")
            t = got.get(field)
            if t is None:
                raise LplrError(f"stored tensor {full} is missing; the output is damaged, re-run the conversion")
            float_ok = field == C.FIELD_FLOAT and t.dtype.is_floating_point and spec.float_dtype is None
            if (str(t.dtype).removeprefix("torch.") != dtype and not float_ok) or tuple(t.shape) != tuple(shape):
                raise LplrError(f"stored tensor {full} has {str(t.dtype).removeprefix('torch.')} {list(t.shape)}, its "
                                f"spec in the manifest says {dtype} {list(shape)}; the output is damaged, re-run the "
                                f"conversion")
        extra = sorted(set(got) - set(want))
        if extra:
            raise LplrError(f"stored tensor {name}.{part.part}.{extra[0]} is not part of its spec in the manifest; the "
                            f"output is damaged, re-run the conversion")


def kernel_counts(modules: Iterable[nn.Module]) -> Counter:
    """How many stored matrices of the PackedLinear modules run on each kernel."""
    return Counter(k for m in modules if isinstance(m, PackedLinear) for k in m.kernels)


def log_kernel_counts(model: nn.Module) -> Counter:
    counts = kernel_counts(model.modules())
    if counts:
        logger.info(f"packed matrices per kernel: {', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}")
    return counts
