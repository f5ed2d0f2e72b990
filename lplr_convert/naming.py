"""Checkpoint tensor names vs. a transformers model's state-dict keys: the base_model_prefix may be added or dropped.

A checkpoint saved from `LlamaForCausalLM` names `model.layers.0...`, one saved from `BertModel` names
`encoder.layer.0...` while `BertForMaskedLM` calls it `bert.encoder.layer.0...`. The same three spellings are tried
everywhere a checkpoint name is matched to a model (loading.py and evaluate.py spell them inline today).
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["match_names", "name_candidates"]


def name_candidates(name: str, prefix: str) -> tuple[str, ...]:
    """The model keys a checkpoint name may stand for, in order: as is, without `prefix.`, with `prefix.` added."""
    if not prefix:
        return (name,)
    return name, name.removeprefix(prefix + "."), f"{prefix}.{name}"


def match_names(names: Iterable[str], keys: Iterable[str], prefix: str) -> dict[str, str]:
    """{checkpoint name: model key} for every checkpoint name that has a place among `keys` (first candidate wins)."""
    keys = set(keys)
    out = {}
    for name in names:
        for cand in name_candidates(name, prefix):
            if cand in keys:
                out[name] = cand
                break
    return out
