"""Input second moments of the linear layers of a module, accumulated by forward pre-hooks.

For a linear layer y = W x (nn.Linear, or transformers' Conv1D whose weight is stored in x out) the statistic is
sum over valid tokens of x x^T (in x in) and the number of those tokens. Layers that receive the very same input
tensor in a forward pass (q/k/v, gate/up) share one statistic; this is read from the tensors the hooks see (same
storage, offset, shape and strides while the first one is still alive), not from the layers' names.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from loguru import logger
from torch import nn

from ..errors import LplrError

__all__ = ["InputMoments", "Moment", "linear_types"]


def linear_types() -> tuple[type, ...]:
    """The module types whose inputs are recorded: nn.Linear and transformers' Conv1D."""
    from transformers.pytorch_utils import Conv1D

    return nn.Linear, Conv1D


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype and a.device == b.device)


@dataclass
class Moment:
    """sum x x^T over `tokens` valid tokens, for the layers in `members` (module names, in call order)."""

    members: list[str]
    sum: torch.Tensor
    tokens: int = 0


@dataclass
class InputMoments:
    """Context manager hooking every linear of `module` (module names get `prefix`); call `start_batch(mask)` with the
    (batch, seq) attention mask before each forward so padding positions are left out."""

    module: nn.Module
    prefix: str
    dtype: torch.dtype = torch.float32
    moments: dict[str, Moment] = field(default_factory=dict)  # keyed by the first layer that saw the input

    def __post_init__(self):
        full = f"{self.prefix}." if self.prefix else ""
        self.linears = {full + n: m for n, m in self.module.named_modules() if isinstance(m, linear_types())}
        self.leader: dict[str, str] = {}  # layer -> key of its moment
        self._handles, self._seen, self._done = [], [], set()
        self._mask, self._valid, self._first = None, 0, True
        self._warned: set[str] = set()

    def __enter__(self):
        for name, mod in self.linears.items():
            self._handles.append(mod.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> bool:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._seen.clear()
        return False

    def start_batch(self, attention_mask: torch.Tensor | None) -> None:
        """Declare the next forward's token mask ((batch, seq), nonzero = real token); None counts every row."""
        if self._seen or self._done:
            self._first = False
        self._seen, self._done = [], set()
        self._mask = None if attention_mask is None else attention_mask.reshape(-1).bool()
        self._valid = 0 if attention_mask is None else int(self._mask.sum())  # one host sync per batch

    def _hook(self, name: str):
        def hook(module, args):
            if not args or not isinstance(args[0], torch.Tensor):
                raise LplrError(f"linear {name} was called without a positional input tensor; calibrate cannot "
                                f"record its input (unsupported architecture)")
            self._record(name, args[0])
        return hook

    def _match(self, x: torch.Tensor) -> str | None:
        for ref, key in self._seen:
            t = ref()
            if t is not None and _same_tensor(t, x):
                return key
        return None

    def _record(self, name: str, x: torch.Tensor) -> None:
        match = self._match(x)
        if self._first and name not in self.leader:
            self.leader[name] = match or name
            if match is not None:
                self.moments[match].members.append(name)
        key = self.leader.get(name, name)
        if match is not None and match == key:
            return  # the same input was already counted for this statistic in this forward
        if key in self._done or name not in self.leader:
            raise LplrError(f"linear {name} sees its input more than once per forward, or shares it differently "
                            f"between batches; calibrate supports layers that run once per forward")
        self._accumulate(key, name, x)
        self._done.add(key)
        self._seen.append((weakref.ref(x), key))

    def _accumulate(self, key: str, name: str, x: torch.Tensor) -> None:
        rows = x.reshape(-1, x.shape[-1])
        if self._mask is not None and rows.shape[0] == self._mask.numel():
            rows, count = rows[self._mask], self._valid
        else:
            count = rows.shape[0]
            if self._mask is not None and name not in self._warned:
                self._warned.add(name)
                logger.warning(f"{name}: input rows do not line up with the tokens; padding is counted for it")
        rows = rows.to(self.dtype)
        m = self.moments.get(key)
        if m is None:
            m = self.moments[key] = Moment([name], torch.zeros(rows.shape[1], rows.shape[1], dtype=self.dtype,
                                                               device=rows.device))
        m.sum.addmm_(rows.T, rows)
        m.tokens += count
