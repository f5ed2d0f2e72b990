"""Fused MoE experts: checkpoints that store all experts of a projection as one 3-D tensor [experts, a, b] (GPT-OSS,
Llama 4, GraniteMoE, JetMoE, Mistral 4, Qwen3.5-MoE, Gemma 4, ...). Each expert's matrix is compressed like any
block linear, in nn.Linear orientation (out x in); the loaders stack the decoded experts back into the 3-D tensor.

Orientation: most families store each expert as [out, in] (nn.Linear's layout); GPT-OSS, Llama 4 and Aria store
[in, out] (their experts compute x @ W[e]). `tests/test_experts.py` checks both by a forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ..math.sketch import derive_seed
from ..methods import Method, MethodResult, Settings

__all__ = ["IN_MAJOR_MODEL_TYPES", "compress_experts", "decode_experts", "expert_count", "experts_in_major",
           "is_stacked_experts"]

# Families whose fused expert tensors are [experts, in, out] (transformers' `is_transposed=True` experts, Llama 4).
IN_MAJOR_MODEL_TYPES = frozenset({"gpt_oss", "llama4", "llama4_text", "aria", "aria_text"})
_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
EXPERTS_KEY = "experts"  # info / extra key holding one entry per expert


def expert_count(config: Mapping | None) -> int | None:
    """The number of routed experts a config declares (searching sub-configs such as text_config), or None."""
    if not isinstance(config, Mapping):
        return None
    for key in _COUNT_KEYS:
        if isinstance(config.get(key), int) and config[key] > 1:
            return config[key]
    for value in config.values():
        found = expert_count(value) if isinstance(value, Mapping) else None
        if found:
            return found
    return None


def is_stacked_experts(name: str, shape: tuple[int, ...], config: Mapping | None) -> bool:
    """A 3-D tensor holding one matrix per expert: its first dimension is the config's expert count, or its path
    names experts."""
    if len(shape) != 3 or min(shape) == 0:
        return False
    count = expert_count(config)
    return shape[0] == count if count else "expert" in name.lower()


def experts_in_major(config: Mapping | None) -> bool:
    """True when the family stores each expert as [in, out] (transposed against nn.Linear)."""
    return (config or {}).get("model_type") in IN_MAJOR_MODEL_TYPES


def compress_experts(method: Method, W: torch.Tensor, settings: Settings, seed: int,
                     transposed: bool) -> MethodResult:
    """Compress each expert W[e] (transposed to out x in when `transposed`) with its own derived seed. Parts are
    "<e>.<part>"; the error and energy are the exact whole-tensor figures (Frobenius over all experts)."""
    parts, infos, rows = {}, [], []
    bits, sq_err, sq_norm, energy = 0, 0.0, 0.0, 0.0
    for e in range(W.shape[0]):
        We = W[e].T if transposed else W[e]
        r = method.compress(We, settings, derive_seed(seed, str(e)))
        norm2 = float(We.double().square().sum())
        parts.update({f"{e}.{k}" if k else str(e): v for k, v in r.parts.items()})
        infos.append(r.info)
        bits += r.stored_bits
        sq_err += r.error() ** 2 * norm2
        sq_norm += norm2
        energy = None if r.energy_kept is None or energy is None else energy + float(r.energy_kept) * norm2
        rows.append({"rank": r.rank, "rel_error": r.error(),
                     "energy_kept": None if r.energy_kept is None else float(r.energy_kept), **r.extra})
    rel = math.sqrt(sq_err / sq_norm) if sq_norm > 0 else 0.0
    kept = None if energy is None or sq_norm == 0 else energy / sq_norm
    return MethodResult(parts, {EXPERTS_KEY: infos}, bits, rel, None, kept, {EXPERTS_KEY: rows})


def decode_experts(method: Method, parts: Mapping[str, torch.Tensor], info: Mapping) -> torch.Tensor:
    """The stacked [experts, out, in] float tensor from the parts `compress_experts` wrote."""
    out = []
    for e, sub in enumerate(info[EXPERTS_KEY]):
        own = {k[len(str(e)) + 1:] if k != str(e) else "": v for k, v in parts.items()
               if k == str(e) or k.startswith(f"{e}.")}
        out.append(method.decode(own, sub))
    return torch.stack(out)
