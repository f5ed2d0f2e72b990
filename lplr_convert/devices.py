"""Choosing the compute device: cpu, cuda, cuda:N, or auto (the GPU when there is one)."""

from __future__ import annotations

import torch

from .errors import LplrError, opt

__all__ = ["resolve_device"]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'cpu', 'cuda', 'cuda:1' or 'auto' (CUDA when available) -> torch.device; anything else is an LplrError."""
    if isinstance(device, torch.device):
        device = str(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise LplrError(f"{opt('device')} {device!r} is not a device; use cpu, cuda, cuda:N or auto") from None
    if dev.type not in ("cpu", "cuda"):
        raise LplrError(f"{opt('device')} {device!r} is not supported; use cpu, cuda, cuda:N or auto")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LplrError(f"{opt('device')} {device} was asked for but no CUDA device is available; use "
                            f"{opt('device')} cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise LplrError(f"{opt('device')} {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev
