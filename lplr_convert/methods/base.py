"""The method registry and the result every method returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..errors import LplrError

if TYPE_CHECKING:
    from .settings import MethodSettings

__all__ = ["Method", "MethodResult", "available_methods", "get_method", "register"]

_REGISTRY: dict[str, Method] = {}


@dataclass
class MethodResult:
    """What a method produced for one weight.

    parts: stored-name suffix -> tensor ("" means the weight's own name); info: JSON-able facts `decode` needs;
    stored_bits: exact bits on disk of every part; rel_error: ||W - W_hat||_F / ||W||_F of what is stored;
    energy_kept: fraction of sum(sigma^2) in the kept components, where known.
    """

    parts: dict[str, torch.Tensor]
    info: dict
    stored_bits: int
    rel_error: torch.Tensor | float
    rank: int | None = None
    energy_kept: torch.Tensor | float | None = None


class Method:
    """A compression method. Subclasses set `name` and implement `compress`, `decode` and `predict`."""

    name: str = ""
    factored: bool = False  # stores a left and a right factor
    uses_rank: bool = True

    def compress(self, W: torch.Tensor, settings: MethodSettings, seed: int) -> MethodResult:
        """Compress a 2-D (out x in) float tensor that already sits on the compute device."""
        raise NotImplementedError

    def decode(self, parts: dict[str, torch.Tensor], info: dict) -> torch.Tensor:
        """Rebuild the dense matrix (out x in) from the stored parts: float32, except `copy`, which returns the stored
        tensor verbatim (any dtype, e.g. int64 position ids)."""
        raise NotImplementedError

    def predict(self, shape: tuple[int, int], dtype: torch.dtype, settings: MethodSettings) -> tuple[int | None, dict]:
        """(rank or None, {suffix: (dtype name, shape)}) of what `compress` would store, computing nothing."""
        raise NotImplementedError


def register(name: str):
    """Class decorator: instantiate and register a method under `name`."""

    def wrap(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls()
        return cls

    return wrap


def get_method(name: str) -> Method:
    """The registered method called `name`; an unknown name lists the registered ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise LplrError(f"method {name!r} is unknown; registered methods: {', '.join(available_methods())}") from None


def available_methods() -> list[str]:
    return sorted(_REGISTRY)
