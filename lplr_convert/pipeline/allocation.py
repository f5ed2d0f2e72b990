"""A global bit budget (`--target-bits-per-param B`): instead of one rank (or width) for every tensor, choose each
compressed tensor's own so that the average stored bits/param over the compressed tensors is at most B and a weighted
sum of the estimated relative squared output errors is as small as the allocator can make it.

The weights (`--budget-objective`): `output-error` weighs each tensor by its parameter count; `sensitivity` by its
estimated effect on the model's loss, sum_o s_o (W H W^T)_oo (`math.weighted.loss_weight`), with s the output
sensitivity `calibrate --sensitivity-samples` measured (`calibration.sensitivity`); `auto` (the default) is
sensitivity when the statistics carry it, else output-error.

Pass 1 (here) reads each compressed tensor once, asks its method for its candidates (`Method.candidates`: stored
bits and an error estimate per choice) and runs the convex-hull greedy of `math.allocate`; pass 2 (the conversion)
compresses each tensor with its chosen settings. Tensors whose method has no choices keep their size, counted
against the budget.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable

import torch
from loguru import logger
from tqdm import tqdm

from ..errors import LplrError, opt
from ..math.allocate import BudgetError, allocate
from ..math.sketch import derive_seed
from ..math.weighted import loss_weight
from ..methods import InputStats, get_method
from ..methods._common import BACKBONES
from .plan import TensorPlan

__all__ = ["OBJECTIVES", "allocate_plans"]

OBJECTIVES = ("auto", "output-error", "sensitivity")


def _fixed_bits(p: TensorPlan, calibrated: bool) -> int:
    """Stored bits of a tensor whose size its settings fix (from the method's prediction)."""
    from ..dtypes import dtype_from_name

    _, specs = get_method(p.method).predict(p.oriented_shape, p.dtype, p.settings, calibrated)
    if not specs:
        raise LplrError(f"{p.name}: its stored size depends on the data ({p.settings.label()}), so a global "
                        f"{opt('target_bits_per_param')} cannot account for it; give it a fixed rank policy")
    return 8 * sum(math.prod(shp) * dtype_from_name(dt).itemsize for dt, shp in specs.values())


def allocate_plans(plans: list[TensorPlan], tensors: Callable[[list[str]], Iterable[tuple[str, torch.Tensor]]],
                   stats_for: Callable[[TensorPlan], InputStats | None], target: float, fixed: frozenset[str],
                   calibrated: bool, seed: int = 0, objective: str = "auto", stats=None
                   ) -> tuple[list[TensorPlan], dict]:
    """Plans with each compressed tensor's settings changed to its allocated choice, and a summary of the allocation
    for the manifest. `tensors(names)` yields (name, oriented float tensor on the compute device) in any order; `seed`
    is the run's global seed (each tensor's seed derives from it, as in the conversion); `objective` one of
    OBJECTIVES, `stats` the CalibrationStats (for the sensitivity)."""
    comp = [p for p in plans if p.method != "copy" and not p.experts]
    if not comp:
        raise LplrError(f"{opt('target_bits_per_param')} needs tensors to compress; nothing is selected")
    from ..methods.base import Method

    def sized(m: Method) -> bool:  # the budget can choose this method's size
        return type(m).candidates is not Method.candidates and not (m.factored and not m.has_base and "rank" in fixed)

    if not any(sized(get_method(p.method)) for p in comp):
        fixed_size = sorted({p.method for p in comp if type(get_method(p.method)).candidates is Method.candidates})
        why = f"{'/'.join(fixed_size)} {'has' if len(fixed_size) == 1 else 'have'} no sizes to choose from" \
            if fixed_size else f"{opt('rank')} fixes every tensor's size"
        raise LplrError(f"{opt('target_bits_per_param')} has nothing to allocate: {why}; drop one of them, or use a "
                        f"method the budget can size (lplr, lsvd, dsvd, qlr, rtn, gptq)")
    objective = _objective(objective, stats)
    by_name = {p.name: p for p in comp}
    loss_weights: dict[str, float] = {}
    BACKBONES.clear()  # what this pass computes and the conversion reuses (`methods._common.BackboneMemo`)
    cands: dict[str, list] = {}
    for name, W in tqdm(tensors(list(by_name)), total=len(comp), desc="allocating", unit="tensor"):
        p = by_name[name]
        inputs = stats_for(p)
        cands[name] = get_method(p.method).candidates(W, p.settings, inputs, target, fixed,
                                                      seed=derive_seed(seed, name))
        sens = stats.sensitivity(name) if objective == "sensitivity" and inputs is not None else None
        if sens is not None and sens.numel() == W.shape[0]:
            loss_weights[name] = loss_weight(W, inputs.H, sens.to(W.device))
    params = sum(math.prod(p.shape) for p in comp)
    fixed_bits = sum(_fixed_bits(p, calibrated) for p in comp if cands.get(p.name) is None)
    chosen = [p for p in comp if cands.get(p.name) is not None]
    if not chosen:
        raise LplrError(f"{opt('target_bits_per_param')} has nothing to allocate: every selected tensor's size is "
                        f"fixed by its settings; drop the target or the settings that fix the sizes")
    budget = math.floor(target * params) - fixed_bits
    weights = _weights(chosen, loss_weights if objective == "sensitivity" else None)
    try:
        alloc = allocate([[(c.bits, w * c.error) for c in cands[p.name]] for p, w in zip(chosen, weights)], budget)
    except BudgetError as e:
        reachable = (e.minimum_bits + fixed_bits) / params
        raise LplrError(f"{opt('target_bits_per_param')} {target:g} cannot be met: the smallest reachable average "
                        f"is {reachable:.3f} bits/param with these settings; raise the target or lower the bit "
                        f"widths") from None
    new = {p.name: dataclasses.replace(p, settings=dataclasses.replace(p.settings, **cands[p.name][i].changes))
           for p, i in zip(chosen, alloc.choice)}
    info = {"target_bits_per_param": target, "objective": objective, "budget_bits": budget + fixed_bits,
            "params": params, "allocated_bits": alloc.bits + fixed_bits, "estimated_error": alloc.error,
            "choices": {p.name: {**_jsonable(cands[p.name][i].changes), "estimated_error": cands[p.name][i].error}
                        for p, i in zip(chosen, alloc.choice)}}
    logger.info(f"allocated {info['allocated_bits'] / params:.3f} bits/param over {len(comp)} tensors "
                f"(target {target:g}, objective {objective}); estimated objective {alloc.error:.4g}")
    return [new.get(p.name, p) for p in plans], info


def _objective(objective: str, stats) -> str:
    """The objective `auto` resolves to; `sensitivity` without it measured is a one-line error."""
    has = stats is not None and stats.has_sensitivity
    if objective == "auto":
        return "sensitivity" if has else "output-error"
    if objective == "sensitivity" and not has:
        where = f"the statistics in {stats.root} carry none" if stats is not None else "no --calibration is given"
        raise LplrError(f"{opt('budget_objective')} sensitivity weighs each tensor by its output sensitivity, but "
                        f"{where}; calibrate with {opt('sensitivity_samples')} N (a causal LM), or use "
                        f"{opt('budget_objective')} output-error")
    return objective


def _weights(chosen: list[TensorPlan], loss_weights: dict[str, float] | None) -> list[float]:
    """The objective's weight of each tensor. Without sensitivities: its parameter count, so the allocator minimises
    the parameter-weighted sum of relative squared output errors (measured slightly better than an unweighted sum on
    all-MiniLM-L6-v2: qlr at 2.25 bits/param cosine 0.850 against 0.841; 0.9904 against 0.9902 at 4.25). With them:
    each tensor's `loss_weight`; a tensor that has none (its statistics say the loss never reached it) is weighed
    as a typical tensor of its size (the median weight per parameter of the others)."""
    params = [float(math.prod(p.shape)) for p in chosen]
    if loss_weights is None:
        return params
    per = sorted(loss_weights[p.name] / n for p, n in zip(chosen, params) if p.name in loss_weights)
    typical = per[len(per) // 2] if per else 1.0
    return [loss_weights.get(p.name, typical * n) for p, n in zip(chosen, params)]


def _jsonable(changes: dict) -> dict:
    return {k: v.to_json() if hasattr(v, "to_json") else v for k, v in changes.items()}
