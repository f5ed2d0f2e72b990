"""Matrix products from stored quantized matrices (tensors in, tensors out; no I/O, logging or configuration).

A stored matrix M (m x n) is what `math.quantize.to_fields` wrote: bit-packed codes (flat, row-major, little end
first), scales, float zeros (minmax) or bit-packed zero points (asymmetric), or a 16/32-bit float matrix. The kernels
compute x @ M^T (a weight in nn.Linear orientation) or x @ M for a 2-D x:

- `tiled_matmul`: any width 1-8, every scheme and granularity. Decodes a block of rows at a time (each block starts
  on a whole block of 8 codes, so on a byte boundary of the flat packing and of the packed zero points) with exactly
  `math.quantize.dequantize`'s operations, casts it to the activation dtype and multiplies: never more than one tile
  of the dense matrix exists, and every tile holds the very values the float loaders decode.
- `int4pack_*`: torch's CPU weight-only kernel (`aten._weight_int4pack_mm_for_cpu`, "tinygemm" layout: w = (c - 8) s
  + z per group of 32/64/128/256 along the input dim). The codes are repacked once into its layout (same bytes); its
  scales-and-zeros (in the activation dtype, as the kernel requires) are formed from the stored scales and zero
  points, z = 0 (symmetric), (8 - zp) s (asymmetric) or lo + 8 s (minmax), and `int4pack_fields` gives the stored
  parameters back from them (exactly where the dtype holds the stored scales, e.g. float16 scales in float16).
- The same kernel family on CUDA (`aten._weight_int4pack_mm`, bfloat16 only): the same arithmetic, groups and
  scales-and-zeros, another weight layout ((m/8, w/(16 t), 32, t/2) int32 for t inner k-tiles), written by
  `aten._convert_weight_to_int4pack` from the codes two to a byte (even column in the high nibble) and opaque: the
  codes are read back through the kernel itself (identity rows as x, s = 1, z = 8 give W^T = the codes, integers
  below 16 being exact in bfloat16). `int4pack_available(device)` checks each device's layout and arithmetic once,
  exactly, on small matrices; where the check fails the tiled path runs.
- `int8pack_*`: torch's `aten._weight_int8pack_mm` (int8 codes, one scale per output row): the codes less 128 as int8
  (same bytes); an asymmetric or minmax offset o (w = (c - 128) s + o) is added as o * sum(x).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from .. import constants as C
from ..math import bitpack
from ..math import quantize as qz

__all__ = [
    "INT4PACK_GROUPS",
    "codes_rows",
    "dequantize_rows",
    "int4pack_available",
    "int4pack_bytes",
    "int4pack_check",
    "int4pack_codes",
    "int4pack_cuda_shape",
    "int4pack_fields",
    "int4pack_kernel_codes",
    "int4pack_layout",
    "int4pack_linear",
    "int4pack_mm",
    "int4pack_pack",
    "int4pack_packed",
    "int4pack_scales_zeros",
    "int4pack_segments",
    "int4pack_weight",
    "int8pack_codes",
    "int8pack_linear",
    "int8pack_offset",
    "int8pack_weight",
    "tile_rows",
    "tiled_matmul",
]

SMALL_FLOAT32 = 1 << 16  # matrices of at most this many entries multiply decode-sized inputs in float32
SMALL_FLOAT32_TOKENS = 32
TILE_BYTES = 4 << 20  # one decoded tile of a matrix: at most this many bytes of working precision (or 8 rows)
INT4PACK_GROUPS = (256, 128, 64, 32)
_INT4PACK_ROWS = 64  # the CPU int4pack layout packs blocks of 64 rows independently: repack that many at a time


def _rows_sliced(spec: qz.QuantSpec) -> bool:
    """The parameters have one row per matrix row (group, or channel along dim 0)."""
    return spec.granularity == "group" or (spec.granularity == "channel" and spec.channel_dim == 0)


def tile_rows(spec: qz.QuantSpec, tile_bytes: int = TILE_BYTES, align: int = 8) -> int:
    """Rows per tile: a multiple of `align` (8: each tile starts on a whole block of 8 codes), about `tile_bytes` of
    float32 working precision."""
    m, n = spec.shape
    rows = max(align, tile_bytes // max(1, 4 * n)) // align * align
    return min(rows, -(-m // align) * align)


def codes_rows(packed: torch.Tensor, spec: qz.QuantSpec, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of the codes (uint8) from the flat packing (`start` a multiple of 8: a whole block)."""
    n = spec.shape[1]
    count = (stop - start) * n
    byte0 = start * n * spec.bits // 8
    return bitpack.unpack(packed[byte0:byte0 + bitpack.packed_nbytes(count, spec.bits)], spec.bits,
                          count).view(stop - start, n)


def dequantize_rows(spec: qz.QuantSpec, fields: dict[str, torch.Tensor], start: int, stop: int,
                    dtype: torch.dtype, codes: torch.Tensor | None = None) -> torch.Tensor:
    """Rows [start, stop) of `dequantize(from_fields(fields, spec), dtype)`, bit for bit, decoding only those rows
    (`start` a multiple of 8), from the flat packing or from those rows' `codes` when given."""
    n = spec.shape[1]
    if spec.bits in qz.FLOAT_BITS:
        return fields[C.FIELD_FLOAT][start:stop].to(dtype)
    rows = stop - start
    if codes is None:
        codes = codes_rows(fields[C.FIELD_PACKED], spec, start, stop)
    sliced = _rows_sliced(spec)
    pick = (lambda t: t[start:stop]) if sliced else (lambda t: t)
    zero = fields.get(C.FIELD_ZERO)
    zero_point = fields.get(C.FIELD_ZERO_POINT)
    if zero_point is not None:
        per_row = spec.scale_shape[1]
        zfirst, zcount = (start * per_row, rows * per_row) if sliced else (0, math.prod(spec.scale_shape))
        zbyte = zfirst * spec.bits // 8
        zero_point = bitpack.unpack(zero_point[zbyte:zbyte + bitpack.packed_nbytes(zcount, spec.bits)], spec.bits,
                                    zcount).view(rows if sliced else spec.scale_shape[0], -1)
    q = qz.Quantized(dataclasses.replace(spec, shape=(rows, n)), codes, pick(fields[C.FIELD_SCALE]),
                     None if zero is None else pick(zero), zero_point)
    return qz.dequantize(q, dtype)


def tiled_matmul(x: torch.Tensor, spec: qz.QuantSpec, fields: dict[str, torch.Tensor], transpose: bool = True,
                 tile_bytes: int = TILE_BYTES, rows: Callable[[int, int], torch.Tensor] | None = None,
                 align: int = 8) -> torch.Tensor:
    """x @ M^T (`transpose`, x: (t, n) -> (t, m)) or x @ M (x: (t, m) -> (t, n)) for the stored M, one decoded tile
    of rows at a time in x's dtype. A 16/32-bit float M already in x's dtype multiplies directly. `rows(start,
    stop)` gives those rows' codes where they are not in the flat packing (tiles then start on multiples of
    `align`)."""
    m, n = spec.shape
    if spec.bits in qz.FLOAT_BITS and fields[C.FIELD_FLOAT].dtype == x.dtype:
        W = fields[C.FIELD_FLOAT]
        return torch.nn.functional.linear(x, W) if transpose else x @ W

    if x.dtype in (torch.bfloat16, torch.float16) and m * n <= SMALL_FLOAT32 and x.shape[0] <= SMALL_FLOAT32_TOKENS:
        # a thin matrix (a low-rank factor) and few tokens: float32 work (the CPU's half-precision products of this
        # size cost 4x the float32 ones, measured: scripts/bench_kernels.py), the result cast back
        return tiled_matmul(x.float(), spec, fields, transpose, tile_bytes, rows, align).to(x.dtype)

    def tile(i: int, j: int) -> torch.Tensor:
        return dequantize_rows(spec, fields, i, j, x.dtype, None if rows is None else rows(i, j))

    step = tile_rows(spec, tile_bytes, align)
    if step >= m:
        W = tile(0, m)
        return torch.nn.functional.linear(x, W) if transpose else x @ W
    if transpose:
        out = torch.empty(x.shape[0], m, dtype=x.dtype, device=x.device)
        for i in range(0, m, step):
            j = min(m, i + step)
            torch.matmul(x, tile(i, j).T, out=out[:, i:j])
        return out
    acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    out = torch.zeros(x.shape[0], n, dtype=acc, device=x.device)
    for i in range(0, m, step):
        j = min(m, i + step)
        out += (x[:, i:j] @ tile(i, j)).to(acc)
    return out.to(x.dtype)


def _up(v: int, k: int) -> int:
    return -(-v // k) * k


def int4pack_segments(spec: qz.QuantSpec, pad: bool = False) -> list[tuple[int, int, int]] | None:
    """How the CPU int4pack kernel runs `spec` (x @ M^T): column segments (start, stop, group), or None when it
    cannot. It needs 4-bit codes, m a multiple of 16, and parameters per row group of 32/64/128/256 (a shorter last
    group of a multiple of 32 columns is a second segment with its group's parameters repeated), or per row / per
    tensor (repeated over the largest such group dividing n). With `pad` (thin matrices: low-rank factors) the rows
    are padded to a multiple of 16 (parameters 0: outputs 0, dropped) and the columns to a multiple of 32 (the
    input padded with zeros): the last segment may end past n."""
    m, n = spec.shape
    if spec.bits != 4 or (spec.granularity == "channel" and spec.channel_dim == 1):
        return None
    if not pad and (m % 16 or n % 32):
        return None
    if spec.granularity != "group":
        w = _up(n, 32)
        return [(0, w, next(g for g in INT4PACK_GROUPS if w % g == 0))]
    g = spec.group_size
    if g not in INT4PACK_GROUPS:
        return None
    full = n // g * g
    out = [(0, full, g)] if full else []
    if full < n:
        w = _up(n - full, 32)
        out.append((full, full + w, next(t for t in INT4PACK_GROUPS if w % t == 0)))
    return out


def _maps_groups(spec: qz.QuantSpec, a: int, b: int) -> bool:
    """Segment [a, b) holds whole stored groups one to one (else it repeats one group's or the row's parameters)."""
    return spec.granularity == "group" and a == 0 and b == spec.shape[1] // spec.group_size * spec.group_size > 0


def _int4pack_block(codes: torch.Tensor) -> torch.Tensor:
    """One block of rows (64, or the last 16/32/48) of 4-bit codes (rows, w) in the CPU int4pack layout: w x rows/2
    bytes, byte t of column j holding rows (t, t + 32) of a 64-row block, rows (2t, 2t + 1) of a shorter one, low
    nibble first; viewed as (rows, w / 2)."""
    rows, w = codes.shape
    lo, hi = (codes[:32], codes[32:]) if rows == _INT4PACK_ROWS else (codes[0::2], codes[1::2])
    return (lo | hi << 4).T.contiguous().view(rows, w // 2)


def _int4pack_unblock(block: torch.Tensor) -> torch.Tensor:
    """Inverse of `_int4pack_block`: (rows, w / 2) bytes -> (rows, w) codes."""
    rows, w = block.shape[0], block.shape[1] * 2
    b = block.reshape(w, rows // 2).T
    lo, hi = b & 15, b >> 4
    return torch.cat([lo, hi]) if rows == _INT4PACK_ROWS else torch.stack([lo, hi], 1).reshape(rows, w)


_INT4PACK_CHECKED: dict[str, bool] = {}


def int4pack_available(device: torch.device | str = "cpu") -> bool:
    """The int4pack ops run on `device` as this module uses them, checked once per device: on the CPU, its layout is
    the one `_int4pack_block` writes (an 80 x 64 matrix: one full block and a short one) and the product is exact
    (`int4pack_check`); on CUDA, `int4pack_check` with the CUDA ops. Other devices: False."""
    device = torch.device(device)
    key = str(device)
    if key not in _INT4PACK_CHECKED:
        try:
            if device.type == "cpu":
                codes = torch.randint(0, 16, (80, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
                ref = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
                ours = torch.cat([_int4pack_block(codes[:64].to(torch.uint8)),
                                  _int4pack_block(codes[64:].to(torch.uint8))])
                _INT4PACK_CHECKED[key] = bool(torch.equal(ref, ours)) and int4pack_check(device)
            elif device.type == "cuda":
                _INT4PACK_CHECKED[key] = int4pack_check(device)
            else:
                _INT4PACK_CHECKED[key] = False
        except (AttributeError, RuntimeError, NotImplementedError, TypeError, ValueError):
            _INT4PACK_CHECKED[key] = False
    return _INT4PACK_CHECKED[key]


def int4pack_layout(device: torch.device | str) -> str:
    """Which int4pack weight layout a device's kernel reads: "cuda" (tinygemm's on CUDA) or "cpu"."""
    return "cuda" if torch.device(device).type == "cuda" else "cpu"


def int4pack_tiles(width: int) -> int:
    """Inner k-tiles of the CUDA layout for a segment `width` wide (a multiple of 32): 8, 4 or 2 (16 columns each)."""
    return next(t for t in (8, 4, 2) if width % (16 * t) == 0)


def _int4pack_cuda(codes: torch.Tensor) -> torch.Tensor:
    """Codes (rows a multiple of 8, width a multiple of 32) in the CUDA layout: two to a byte, even column high."""
    pairs = (codes[:, 0::2] << 4 | codes[:, 1::2]).contiguous()
    return torch.ops.aten._convert_weight_to_int4pack(pairs, int4pack_tiles(codes.shape[1]))


def int4pack_cuda_shape(rows: int, width: int) -> tuple[int, int, int, int]:
    """Shape of the CUDA layout of `rows` x `width` codes (int32)."""
    t = int4pack_tiles(width)
    return rows // 8, width // (16 * t), 32, t // 2


def int4pack_mm(device: torch.device | str) -> Callable:
    """The kernel of a device's layout: (x (t, w), weight, group, scales-and-zeros (w / group, m, 2)) -> (t, m)."""
    if int4pack_layout(device) == "cuda":
        return torch.ops.aten._weight_int4pack_mm.default
    return torch.ops.aten._weight_int4pack_mm_for_cpu.default


def int4pack_pack(codes: torch.Tensor, layout: str) -> torch.Tensor:
    """4-bit codes (rows a multiple of 16, width a multiple of 32) in `layout`."""
    return _int4pack_cuda(codes) if layout == "cuda" else _int4pack_blocks(codes)


def int4pack_check(device: torch.device | str) -> bool:
    """The device's int4pack pack and kernel compute (c - 8) s + z exactly as this module assumes: for widths of 8,
    4 and 2 inner k-tiles (256, 64, 32) and groups of 32..256, identity rows through the kernel give W^T bit for bit
    (s in {0.5, 1, 2} and integer z: every value exact in bfloat16), and `int4pack_kernel_codes` gives the codes."""
    device = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    layout, mm = int4pack_layout(device), int4pack_mm(device)
    for width, group in ((256, 64), (64, 32), (32, 32), (256, 256)):
        codes = torch.randint(0, 16, (32, width), dtype=torch.uint8, generator=gen)
        s = torch.tensor([0.5, 1.0, 2.0])[torch.randint(0, 3, (32, width // group), generator=gen)]
        z = torch.randint(-4, 5, (32, width // group), generator=gen).float()
        W = (codes.float() - 8) * s.repeat_interleave(group, 1) + z.repeat_interleave(group, 1)
        sz = torch.stack([s, z], -1).transpose(0, 1).contiguous().to(torch.bfloat16).to(device)
        weight = int4pack_pack(codes.to(device), layout)
        got = mm(torch.eye(width, dtype=torch.bfloat16, device=device), weight, group, sz)
        if not torch.equal(got.float().cpu(), W.T):
            return False
        back = int4pack_kernel_codes(mm, [weight], [(0, width, group)], 32, width)
        if not torch.equal(back.cpu(), codes):
            return False
    return True


def int4pack_kernel_codes(mm: Callable, weights: list[torch.Tensor], segments: list[tuple[int, int, int]], m: int,
                          n: int, tile_bytes: int = TILE_BYTES) -> torch.Tensor:
    """The (m, n) codes (uint8) held in any int4pack layout, read through its kernel `mm`: rows of the identity as x
    with s = 1 and z = 8 give W^T = the codes exactly; about `tile_bytes` of output at a time."""
    device = weights[0].device
    out = torch.empty(m, n, dtype=torch.uint8, device=device)
    for w, (a, b, g) in zip(weights, segments):
        rows = _up(m, 16)
        sz = torch.tensor([1.0, 8.0], dtype=torch.bfloat16, device=device).expand((b - a) // g, rows, 2).contiguous()
        step = max(1, tile_bytes // (2 * rows))
        for c in range(a, min(b, n), step):
            d = min(b, n, c + step)
            x = torch.zeros(d - c, b - a, dtype=torch.bfloat16, device=device)
            x[torch.arange(d - c, device=device), torch.arange(c - a, d - a, device=device)] = 1
            out[:, c:d] = mm(x, w, g, sz)[:, :m].T.to(torch.uint8)
    return out


def _int4pack_blocks(codes: torch.Tensor) -> torch.Tensor:
    """`_int4pack_block` of every block of 64 rows of `codes` (rows a multiple of 16), whole 64-row blocks at once."""
    rows, w = codes.shape
    full = rows // _INT4PACK_ROWS * _INT4PACK_ROWS
    out = []
    if full:
        b = codes[:full].view(-1, 2, 32, w)  # (blocks, lo/hi, 32, w)
        out.append((b[:, 0] | b[:, 1] << 4).transpose(1, 2).contiguous().view(full, w // 2))
    if full < rows:
        out.append(_int4pack_block(codes[full:]))
    return out[0] if len(out) == 1 else torch.cat(out)


def int4pack_weight(packed: torch.Tensor, spec: qz.QuantSpec, segments: list[tuple[int, int, int]],
                    layout: str = "cpu") -> list[torch.Tensor]:
    """The stored 4-bit codes of each column segment in the CPU int4pack layout ((m, width / 2) uint8: together the
    same bytes as stored; padded rows and columns hold code 8), about `TILE_BYTES` of codes at a time; or in the CUDA
    layout (`layout="cuda"`: the same bytes, int32; its op packs whole matrices, so all codes one byte each exist for
    a moment)."""
    m, n = spec.shape
    mp, width = _up(m, 16), segments[-1][1]
    if layout == "cuda":
        codes = torch.full((mp, width), 8, dtype=torch.uint8, device=packed.device)
        codes[:m, :n] = codes_rows(packed, spec, 0, m)
        return [_int4pack_cuda(codes[:, a:b]) for a, b, _ in segments]
    outs = [torch.empty(mp, (b - a) // 2, dtype=torch.uint8, device=packed.device) for a, b, _ in segments]
    step = max(_INT4PACK_ROWS, TILE_BYTES // max(1, width) // _INT4PACK_ROWS * _INT4PACK_ROWS)
    for i in range(0, mp, step):
        j = min(mp, i + step)
        if j <= m and width == n:
            codes = codes_rows(packed, spec, i, j)
        else:
            codes = torch.full((j - i, width), 8, dtype=torch.uint8, device=packed.device)
            if i < m:
                codes[:min(j, m) - i, :n] = codes_rows(packed, spec, i, min(j, m))
        for out, (a, b, _) in zip(outs, segments):
            out[i:j] = _int4pack_blocks(codes[:, a:b])
    return outs


def int4pack_codes(weights: list[torch.Tensor], start: int, stop: int, n: int | None = None) -> torch.Tensor:
    """Rows [start, stop) of the codes (uint8) from the int4pack layout (`start` a multiple of 64), the first `n`
    columns (all when None)."""
    out = []
    for w in weights:
        blocks = [_int4pack_unblock(w[i:min(w.shape[0], i + _INT4PACK_ROWS)])
                  for i in range(start, stop, _INT4PACK_ROWS)]
        out.append(torch.cat(blocks)[:stop - start])
    codes = out[0] if len(out) == 1 else torch.cat(out, dim=1)
    return codes if n is None or codes.shape[1] == n else codes[:, :n].contiguous()


def int4pack_packed(weights: list[torch.Tensor], spec: qz.QuantSpec) -> torch.Tensor:
    """The flat packing of the codes held in the int4pack layout (inverse of `int4pack_weight`)."""
    m, n = spec.shape
    out = torch.empty(bitpack.packed_nbytes(m * n, 4), dtype=torch.uint8, device=weights[0].device)
    for i in range(0, m, _INT4PACK_ROWS):
        j = min(m, i + _INT4PACK_ROWS)
        out[i * n // 2:(j * n + 1) // 2] = bitpack.pack(int4pack_codes(weights, i, j, n), 4, check=False)
    return out


def int4pack_scales_zeros(spec: qz.QuantSpec, fields: dict[str, torch.Tensor], segments: list[tuple[int, int, int]],
                          dtype: torch.dtype) -> list[torch.Tensor]:
    """The kernel's scales-and-zeros of each segment ((width / group, m, 2) in `dtype`; padded rows 0) from the
    stored parameters: w = (c - 8) s + z with z = 0 (symmetric), (8 - zp) s (asymmetric), lo + 8 s (minmax),
    computed in float32 (exact for float16 scales: (8 - zp) s has at most 15 significant bits)."""
    m = spec.shape[0]
    mp = _up(m, 16)
    s = fields[C.FIELD_SCALE].float()
    if spec.scheme == "symmetric":
        z = torch.zeros_like(s)
    elif spec.scheme == "asymmetric":
        zp = bitpack.unpack(fields[C.FIELD_ZERO_POINT], 4, math.prod(spec.scale_shape)).view(spec.scale_shape)
        z = (8 - zp.float()) * s
    else:
        z = fields[C.FIELD_ZERO].float() + 8 * s
    sz = torch.stack([s, z], dim=-1)  # (m or 1, G or 1, 2)
    out = []
    for a, b, g in segments:
        if _maps_groups(spec, a, b):  # one stored group per kernel group
            part = sz[:, :b // spec.group_size]
        else:  # the short last stored group, or the row's / tensor's parameters, repeated
            part = sz[:, -1:].expand(m, (b - a) // g, 2)
        if mp > m:
            part = torch.cat([part, part.new_zeros(mp - m, *part.shape[1:])])
        out.append(part.transpose(0, 1).to(dtype).contiguous())
    return out


def int4pack_bytes(spec: qz.QuantSpec, segments: list[tuple[int, int, int]], dtype: torch.dtype) -> int:
    """Bytes a matrix holds in the int4pack layout with cached scales: its (padded) codes plus the kernel's
    scales-and-zeros in `dtype`."""
    mp = _up(spec.shape[0], 16)
    return mp * segments[-1][1] // 2 + sum((b - a) // g * mp * 2 for a, b, g in segments) * torch.finfo(dtype).bits // 8


def int4pack_fields(spec: qz.QuantSpec, scales_zeros: list[torch.Tensor], segments: list[tuple[int, int, int]],
                    ) -> dict[str, torch.Tensor]:
    """The stored parameters (scale, zero or bit-packed zero points, in their stored dtypes) from the kernel's
    scales-and-zeros (inverse of `int4pack_scales_zeros`): s as held, rounded to the stored scale dtype; zp =
    round(8 - z / s) (exact: the rounding of z is far below half a step), 0 where s = 0; lo = z - 8 s."""
    parts = []
    for sz, (a, b, _) in zip(scales_zeros, segments):
        t = sz.float().transpose(0, 1)[:spec.shape[0]]  # (m, groups, 2), padded rows dropped
        if _maps_groups(spec, a, b):
            parts.append(t)
        else:  # one stored group (the short last one), or one value per row / tensor, repeated over the segment
            parts.append(t[:, :1])
    t = torch.cat(parts, dim=1) if spec.granularity == "group" else parts[0]
    if spec.granularity == "tensor":
        t = t[:1]
    s, z = t[..., 0].reshape(spec.scale_shape), t[..., 1].reshape(spec.scale_shape)
    types = qz.field_specs(spec)
    out = {C.FIELD_SCALE: s.to(getattr(torch, types[C.FIELD_SCALE][0])).contiguous()}
    s = out[C.FIELD_SCALE].float()
    if spec.scheme == "asymmetric":
        zp = torch.where(s == 0, 0.0, 8 - z / torch.where(s == 0, 1.0, s)).round().clamp(0, 15)
        out[C.FIELD_ZERO_POINT] = bitpack.pack(zp.to(torch.uint8).reshape(-1), 4, check=False)
    elif spec.scheme == "minmax":
        out[C.FIELD_ZERO] = (z - 8 * s).contiguous()
    return out


def int4pack_linear(x: torch.Tensor, weights: list[torch.Tensor], segments: list[tuple[int, int, int]],
                    scales_zeros: list[torch.Tensor], m: int | None = None) -> torch.Tensor:
    """x @ W^T on the int4pack kernel of the weights' device, one call per column segment (x 2-D: on the CPU
    float32/bfloat16/float16, on CUDA bfloat16; scales_zeros in x's dtype); x is padded with zero columns to the
    segments' width, and the output cut to `m` rows of W when given (padded rows)."""
    width = segments[-1][1]
    if x.shape[1] < width:
        x = torch.nn.functional.pad(x, (0, width - x.shape[1]))
    mm = int4pack_mm(weights[0].device)  # the overload itself: no dispatch by arguments
    y = None
    for w, (a, b, g), sz in zip(weights, segments, scales_zeros):
        xs = x if (a, b) == (0, width) else x[:, a:b]
        part = mm(xs.contiguous(), w, g, sz)
        y = part if y is None else y.add_(part)
    return y if m is None or m == y.shape[1] else y[:, :m]


def int8pack_weight(packed: torch.Tensor, spec: qz.QuantSpec) -> torch.Tensor:
    """8-bit codes c as the int8 c - 128, (m, n) (the same bytes)."""
    return (packed ^ 0x80).view(torch.int8).view(spec.shape)


def int8pack_codes(weight: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of the codes (uint8) from the int8 weight."""
    return weight[start:stop].view(torch.uint8) ^ 0x80


def int8pack_offset(spec: qz.QuantSpec, fields: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """o (per row, float32) with w = (c - 128) s + o: None (symmetric), (128 - zp) s (asymmetric), lo + 128 s
    (minmax)."""
    s = fields[C.FIELD_SCALE].float().reshape(-1)
    if spec.scheme == "symmetric":
        return None
    if spec.scheme == "asymmetric":
        return (128 - fields[C.FIELD_ZERO_POINT].float().reshape(-1)) * s
    return fields[C.FIELD_ZERO].float().reshape(-1) + 128 * s


def int8pack_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                    offset: torch.Tensor | None) -> torch.Tensor:
    """x @ W^T with W = weight * scale (+ offset) row by row, on `aten._weight_int8pack_mm` (x float32/float16;
    scale and offset broadcast over the m rows)."""
    m = weight.shape[0]
    y = torch.ops.aten._weight_int8pack_mm(x.contiguous(), weight, scale.to(x.dtype).reshape(-1).expand(m)
                                           .contiguous())
    if offset is not None:
        y = y + x.sum(-1, keepdim=True, dtype=torch.float32).to(x.dtype) * offset.to(x.dtype).reshape(1, -1)
    return y
