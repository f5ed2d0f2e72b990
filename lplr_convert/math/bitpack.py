"""Exact bit packing of b-bit codes (1 <= b <= 8) into uint8, little end first; and into int32 words row by row (the
layout of compressed-tensors' `pack-quantized` format)."""

from __future__ import annotations

import torch

__all__ = ["pack", "pack_rows_int32", "packed_nbytes", "unpack"]

# Blocks of 8 codes handled per step by the general (3, 5, 6, 7-bit) path: bounds its int64 temporaries to ~64 MiB.
_CHUNK_BLOCKS = 1 << 20


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes that `pack` produces for `numel` codes of width `bits`."""
    return (numel * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bit width {bits!r} cannot be packed; use an integer from 1 to 8")


def _padded(flat: torch.Tensor, multiple: int, dtype: torch.dtype) -> torch.Tensor:
    """`flat` as `dtype`, zero-padded to a multiple of `multiple` entries."""
    pad = -flat.numel() % multiple
    out = flat.to(dtype)
    return torch.cat([out, out.new_zeros(pad)]) if pad else out


def _pack_blocks(blocks: torch.Tensor, bits: int) -> torch.Tensor:
    """(nblocks, 8) int64 codes -> (nblocks * bits,) uint8."""
    shifts = torch.arange(8, device=blocks.device, dtype=torch.int64) * bits
    value = (blocks << shifts).sum(dim=1)  # < 2**56, fits in int64
    byte_shifts = torch.arange(bits, device=blocks.device, dtype=torch.int64) * 8
    return ((value.unsqueeze(1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def _unpack_blocks(raw: torch.Tensor, bits: int) -> torch.Tensor:
    """(nblocks * bits,) uint8 -> (nblocks * 8,) uint8 codes."""
    byte_shifts = torch.arange(bits, device=raw.device, dtype=torch.int64) * 8
    value = (raw.to(torch.int64).view(-1, bits) << byte_shifts).sum(dim=1)
    shifts = torch.arange(8, device=raw.device, dtype=torch.int64) * bits
    return ((value.unsqueeze(1) >> shifts) & ((1 << bits) - 1)).to(torch.uint8).reshape(-1)


def pack(codes: torch.Tensor, bits: int, check: bool = True) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) into a 1-D uint8 tensor of ceil(numel*bits/8) bytes.

    Eight codes form one block of `bits` bytes; code j of a block occupies bits [j*bits, (j+1)*bits) of the
    block read as a little-endian integer. For 1, 2 and 4 bits that is simply 8/bits codes per byte, lowest first,
    which is packed in uint8 directly; other widths go through int64 a bounded chunk at a time.
    `check=False` skips the range check (a full pass and a device synchronisation) for codes that are in range by
    construction.
    """
    _check_bits(bits)
    flat = codes.reshape(-1)
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
    if check and flat.numel():
        lo, hi = torch.aminmax(flat)
        if int(lo) < 0 or int(hi) >= 1 << bits:
            raise ValueError(f"codes span [{int(lo)}, {int(hi)}], outside [0, {(1 << bits) - 1}] "
                             f"for {bits}-bit packing")
    if bits == 8:
        return flat.to(torch.uint8).clone()
    nbytes = packed_nbytes(flat.numel(), bits)
    if 8 % bits == 0:
        per = 8 // bits
        grid = _padded(flat, per, torch.uint8).view(-1, per)
        out = grid[:, 0].clone()
        for j in range(1, per):
            out |= grid[:, j] << (j * bits)
        return out
    out = torch.empty(nbytes, dtype=torch.uint8, device=flat.device)
    step = _CHUNK_BLOCKS * 8
    for start in range(0, flat.numel(), step):
        blocks = _padded(flat[start:start + step], 8, torch.int64).view(-1, 8)
        packed = _pack_blocks(blocks, bits)
        first = start // 8 * bits
        take = min(packed.numel(), nbytes - first)
        out[first:first + take] = packed[:take]
    return out


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of `pack`: the first `numel` codes as a 1-D uint8 tensor."""
    _check_bits(bits)
    flat = packed.reshape(-1)
    if flat.numel() != packed_nbytes(numel, bits):
        raise ValueError(f"packed buffer has {flat.numel()} bytes, expected {packed_nbytes(numel, bits)} "
                         f"for {numel} codes of {bits} bits")
    if bits == 8:
        return flat.clone()
    if 8 % bits == 0:
        per, mask = 8 // bits, (1 << bits) - 1
        raw = flat.to(torch.uint8)
        out = torch.stack([(raw >> (j * bits)) & mask for j in range(per)], dim=1).reshape(-1)
        return out[:numel].clone() if out.numel() != numel else out
    out = torch.empty(numel, dtype=torch.uint8, device=flat.device)
    step = _CHUNK_BLOCKS * bits
    for start in range(0, flat.numel(), step):
        raw = _padded(flat[start:start + step], bits, torch.uint8)
        codes = _unpack_blocks(raw, bits)
        first = start // bits * 8
        take = min(codes.numel(), numel - first)
        out[first:first + take] = codes[:take]
    return out


def pack_rows_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a 2-D tensor of codes in [0, 2**bits) row by row into int32 words: (m, n) -> (m, ceil(n * bits / 32)).

    Each row is one bit stream, little end first as in `pack` (code j at bits [j * bits, (j + 1) * bits)), zero-padded
    to whole 32-bit words; word k holds bits [32 k, 32 k + 32) of its row, stored as the two's-complement int32 of
    those 32 bits. This is compressed-tensors' dense `pack_to_int32` layout of the unsigned values (its codes plus
    2**(bits - 1)). Exact; the words are assembled arithmetically, so the host's byte order does not matter.
    """
    _check_bits(bits)
    if codes.dim() != 2:
        raise ValueError(f"pack_rows_int32 expects a 2-D tensor of codes, got shape {tuple(codes.shape)}")
    m, n = codes.shape
    pad = -n % 32  # whole blocks of 32 codes: every padded row is a whole number of words
    if pad:
        codes = torch.cat([codes, codes.new_zeros(m, pad)], dim=1)
    raw = pack(codes, bits).view(m, -1, 4).to(torch.int64)
    words = raw[..., 0] | raw[..., 1] << 8 | raw[..., 2] << 16 | raw[..., 3] << 24
    words -= (words >> 31) << 32  # unsigned 32-bit value -> two's complement
    return words[:, : (n * bits + 31) // 32].to(torch.int32).contiguous()
