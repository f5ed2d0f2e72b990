"""How transformers 5 maps checkpoint names onto a model: the model's renamings (applied to every checkpoint key first)
and its converters, which merge several checkpoint tensors into one parameter (e.g. Mixtral's per-expert
`experts.N.w1.weight` into one fused `experts.gate_up_proj`). Shared by `from_pretrained` (`hf.converters`) and the
exports, which must know where transformers puts each stored tensor.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

from torch import nn

__all__ = ["converter_matches", "merged_names", "model_conversions", "renamed"]


def model_conversions(model: nn.Module) -> list:
    """The renamings and converters transformers applies when it loads a checkpoint into `model`."""
    from transformers.conversion_mapping import get_model_conversion_mapping

    return list(get_model_conversion_mapping(model))


def renamed(name: str, conversions: list) -> str:
    """`name` after the renamings among `conversions` (their "used" marks, which decide how models save, are kept)."""
    from transformers.core_model_loading import WeightRenaming, apply_renamings

    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    used = [r._was_used for r in renamings]
    try:
        return apply_renamings(name, renamings)
    finally:
        for r, flag in zip(renamings, used):
            r._was_used = flag


def converter_matches(conv, names: Iterable[str]) -> list[str]:
    """The checkpoint keys among `names` (already renamed) that the converter `conv` collects; [] when `conv` is no
    converter. Probed on a copy: matching marks a converter used."""
    from transformers.core_model_loading import WeightConverter

    if not isinstance(conv, WeightConverter):
        return []
    probe = copy.deepcopy(conv)
    return [n for n in names if probe.rename_source_key(n)[1] is not None]


def merged_names(names: Iterable[str], conversions: list) -> set[str]:
    """The checkpoint keys among `names` that one of the model's converters merges into another parameter."""
    by_renamed = {renamed(n, conversions): n for n in names}
    return {by_renamed[m] for conv in conversions for m in converter_matches(conv, by_renamed)}
