"""Exact bit packing of b-bit codes (1 <= b <= 8) into uint8, little end first."""

from __future__ import annotations

import torch

__all__ = ["pack", "packed_nbytes", "unpack"]


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes that `pack` produces for `numel` codes of width `bits`."""
    return (numel * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bit width {bits!r} cannot be packed; use an integer from 1 to 8")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) into a 1-D uint8 tensor of ceil(numel*bits/8) bytes.

    Eight codes form one block of `bits` bytes; code j of a block occupies bits [j*bits, (j+1)*bits) of the
    block read as a little-endian integer.
    """
    _check_bits(bits)
    flat = codes.reshape(-1)
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"codes span [{int(flat.min())}, {int(flat.max())}], outside [0, {(1 << bits) - 1}] "
                         f"for {bits}-bit packing")
    if bits == 8:
        return flat.to(torch.uint8).clone()
    numel = flat.numel()
    nblocks = (numel + 7) // 8
    padded = torch.zeros(nblocks * 8, dtype=torch.int64, device=flat.device)
    padded[:numel] = flat.to(torch.int64)
    blocks = padded.view(nblocks, 8)
    shifts = torch.arange(8, device=flat.device, dtype=torch.int64) * bits
    value = (blocks << shifts).sum(dim=1)  # < 2**56, fits in int64
    byte_shifts = torch.arange(bits, device=flat.device, dtype=torch.int64) * 8
    out = ((value.unsqueeze(1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)
    return out[: packed_nbytes(numel, bits)].clone()


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of `pack`: the first `numel` codes as a 1-D uint8 tensor."""
    _check_bits(bits)
    flat = packed.reshape(-1)
    if flat.numel() != packed_nbytes(numel, bits):
        raise ValueError(f"packed buffer has {flat.numel()} bytes, expected {packed_nbytes(numel, bits)} "
                         f"for {numel} codes of {bits} bits")
    if bits == 8:
        return flat.clone()
    nblocks = (numel + 7) // 8
    full = torch.zeros(nblocks * bits, dtype=torch.int64, device=flat.device)
    full[: flat.numel()] = flat.to(torch.int64)
    byte_shifts = torch.arange(bits, device=flat.device, dtype=torch.int64) * 8
    value = (full.view(nblocks, bits) << byte_shifts).sum(dim=1)
    shifts = torch.arange(8, device=flat.device, dtype=torch.int64) * bits
    codes = (value.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(-1)[:numel].to(torch.uint8)
