"""Loading a converted checkpoint: the dense state dict, or a transformers model whose compressed linears stay
factored (LowRankLinear) or are loaded dense."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from loguru import logger

from .. import constants as C
from ..errors import LplrError
from ..io.output import ConvertedOutput
from .modeling import (
    config_dtype,
    float32_kept,
    linear_target,
    lowrank_for,
    model_class,
    name_candidates,
    packed_for,
    packed_target,
    params_on_meta,
    set_module,
)
from .tying import tie_as_transformers

__all__ = ["iter_dense", "load_model", "load_state_dict"]


def iter_dense(path: str | Path, device: str = "cpu", verify: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, dense tensor) for every tensor of a converted directory, in manifest order, one at a time.

    With verify=True (the default) every shard's sha256 is checked against the manifest before it is used.
    """
    with ConvertedOutput(path, device, verify) as output:
        yield from output.iter_dense()


def load_state_dict(path: str | Path, device: str = "cpu", verify: bool = True) -> dict[str, torch.Tensor]:
    """The dense reconstituted state dict: original names, shapes, dtypes (Conv1D orientation restored).

    Raises LplrError (never returns a wrong tensor) when the directory is incomplete, damaged or modified.
    """
    return dict(iter_dense(path, device, verify))


def _assign_dense(model, dense: dict[str, torch.Tensor], prefix: str, replaced: set[str] = frozenset()) -> None:
    keys_now = set(model.state_dict().keys())
    remapped = {}
    for k, v in dense.items():
        cand = next((c for c in name_candidates(k, prefix) if c in keys_now), None)
        if cand is None:
            logger.debug(f"checkpoint tensor {k} has no place in {type(model).__name__} by name")
        else:
            remapped[cand] = v
    model.load_state_dict(remapped, strict=False, assign=True)
    tie_as_transformers(model, set(remapped), replaced)


def _load_direct(output: ConvertedOutput, factored: bool, device: str, dtype, packed: bool = False,
                 kernel: str | None = None):
    """Checkpoint names used as they are (base_model_prefix added or dropped): no dense init, packed (or factored)
    layers built straight from the stored codes. Returns None when the model's names differ (transformers 5 renames
    or fuses some families' weights on load)."""
    cls, config = model_class(output.root)
    with params_on_meta():
        model = cls(config).eval()
    prefix = getattr(model, "base_model_prefix", "") or ""
    kept = float32_kept(model, dtype or config_dtype(config))
    dense: dict[str, torch.Tensor] = {}
    replaced: set[str] = set()  # the weights of modules replaced by factored layers
    names = dict(model.named_modules())
    for rec in output.records:  # one record's stored tensors at a time, dropped once its module or tensor is built
        want = torch.float32 if kept(rec.name) else dtype  # transformers keeps some modules in float32 (T5's wo)
        hit = packed_target(model, rec, prefix, names) if packed else None
        if hit is not None:
            set_module(model, hit[0], packed_for(hit[1], rec, hit[2], output.parts(rec), device, want, kernel))
            replaced.add(f"{hit[0]}.weight")
            continue
        target = linear_target(model, rec, prefix, names) if factored else None
        if target is not None:
            set_module(model, target[0], lowrank_for(target[1], rec, output.parts(rec), device, want))
            replaced.add(f"{target[0]}.weight")
            continue
        dense[rec.name] = output.dense_as(rec, want, device)  # a copied tensor is read straight into `want`
    _assign_dense(model, dense, prefix, replaced)
    if any(p.device.type == "meta" for p in model.parameters()):
        return None
    logger.info(f"loaded {type(model).__name__} with {len(replaced)} {'packed' if packed else 'factored'} layers")
    return model


def _load_via_transformers(output: ConvertedOutput, factored: bool, device: str, dtype, packed: bool = False,
                           kernel: str | None = None):
    """Dense weights through transformers' own loading (its renames and fusions), then packed (or factored) layers
    swapped in."""
    cls, config = model_class(output.root)
    dense = dict(output.iter_dense())
    try:
        model = cls.from_pretrained(None, config=config, state_dict=dense, dtype=dtype or "auto").eval()
    except Exception as e:  # noqa: BLE001  (any loading failure becomes one line)
        raise LplrError(f"{cls.__name__} cannot be built from the converted weights ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''}); the config does not match them") from None
    del dense
    replaced = 0
    if factored or packed:
        prefix = getattr(model, "base_model_prefix", "") or ""
        kept = float32_kept(model, dtype or config_dtype(config))
        for rec in output.records:
            hit = packed_target(model, rec, prefix) if packed else None
            if hit is not None:
                want = torch.float32 if kept(rec.name) else dtype
                set_module(model, hit[0], packed_for(hit[1], rec, hit[2], output.parts(rec), device, want, kernel))
                replaced += 1
                continue
            target = linear_target(model, rec, prefix) if factored else None
            if target is not None:
                want = torch.float32 if kept(rec.name) else dtype
                set_module(model, target[0], lowrank_for(target[1], rec, output.parts(rec), device, want))
                replaced += 1
    logger.info(f"loaded {type(model).__name__} through transformers' weight mapping with {replaced} "
                f"{'packed' if packed else 'factored'} layers")
    return model


def load_model(path: str | Path, factored: bool | None = None, device: str = "cpu", dtype: torch.dtype | None = None,
               verify: bool = True, packed: bool | None = None, kernel: str | None = None):
    """A transformers model built from config.json. No trust_remote_code.

    packed (the default unless `factored` is given): every linear whose weight is stored as quantized matrices
    (rtn, gptq, lplr, lsvd, dsvd, qlr) becomes a `runtime.PackedLinear` holding the stored codes, scales and zero
    points and computing y = Q x + L (R x) + b from them; its kernel is chosen per matrix and device (`kernel=` or
    $LPLR_KERNEL overrides: "auto", "tiled", "int4pack", "int8pack"). laser weights, copied tensors and fused MoE
    experts load dense. packed=False gives float modules: factored=True (the default then) replaces every factored
    linear (lplr/lsvd/dsvd/qlr) by a LowRankLinear computing y = L(R x) (+ Q x) + b with float factors;
    factored=False loads dense reconstituted weights everywhere. Parameters are created on the meta device and never
    initialised densely, except for architectures whose module names differ from their checkpoint names (e.g.
    fused MoE experts in transformers 5): those go through transformers' own loading of the dense weights first.
    Fused 3-D experts tensors (compressed expert by expert) are stacked back and load dense.
    """
    from ..runtime.modules import balance, check_kernel, log_kernel_counts

    packed = factored is None if packed is None else packed
    factored = True if factored is None else factored
    if packed:
        kernel = check_kernel(kernel)
    with ConvertedOutput(path, device, verify) as output:
        output.side_file(C.CONFIG_FILE)  # the model is built from it: checked like the shards
        output.side_file(C.SAFE_INDEX)
        model = _load_direct(output, factored, device, dtype, packed, kernel)
        if model is None:
            output.verify = False  # every shard was checked on the first pass
            model = _load_via_transformers(output, factored, device, dtype, packed, kernel)
    model = model.to(device).eval()
    if packed:
        balance(model)
        log_kernel_counts(model)
    return model
