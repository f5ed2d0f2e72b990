"""Tied weights (an output embedding tied to the input one): the one rule every loader follows, transformers' own.

transformers' `from_pretrained` ties a pair the config ties when the checkpoint stores only one of them, or both with
equal values; when both are stored with different values (a published checkpoint's own head, or a head this tool
compressed beside a copied embedding) each keeps its stored weights. `from_pretrained` of a converted directory and
of a `decompress`/`export` output get that rule from transformers; `load_model` builds its model itself and applies
it here, so every loader gives the same model.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["tie_as_transformers"]


def tie_as_transformers(model: nn.Module, loaded: set[str], replaced: set[str] = frozenset()) -> None:
    """Tie `model`'s tied parameters as transformers does for a checkpoint holding the model parameters `loaded`.
    `replaced`: parameters whose module the loader replaced by a factored layer (they count as stored, with weights of
    their own: never tied)."""
    tied = getattr(model, "all_tied_weights_keys", None)
    if not isinstance(tied, dict):  # not a transformers 5 model: its own tie_weights decides
        if hasattr(model, "tie_weights"):
            model.tie_weights()
        return
    params = dict(model.named_parameters(remove_duplicate=False))
    present = set(loaded) | set(replaced)
    for target, source in list(tied.items()):
        if target in present and source in present and (
                target in replaced or source in replaced or not _equal(params.get(target), params.get(source))):
            tied.pop(target)  # both stored and different: each keeps its own (as transformers' from_pretrained)
    if tied:
        model.tie_weights(missing_keys=set(params) - present, recompute_mapping=False)


def _equal(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None or a.device.type == "meta" or b.device.type == "meta":
        return False
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b.to(a.device)))


def untie_replaced(model: nn.Module, module_name: str) -> None:
    """A module of `model` replaced by a factored layer before transformers loads into it keeps its own stored
    weights: drop it from the model's tied pairs (as target or source), as `tie_as_transformers` does."""
    tied = getattr(model, "all_tied_weights_keys", None)
    if isinstance(tied, dict):
        key = f"{module_name}.weight"
        for target, source in list(tied.items()):
            if key in (target, source):
                tied.pop(target)
