"""`export --format peft`: the low-rank corrections of a qlr conversion (W = Q + L R) as a PEFT LoRA adapter, to apply
over the compressed-tensors export of the same conversion, whose base holds the backbones Q (`common`'s placement
rule). Base plus adapter compute y = Q x + L (R x) for every module: the conversion's own model.

- `adapter_model.safetensors`: `base_model.model.<module>.lora_A.weight` = R (r x in) and `.lora_B.weight` = L
  (out x r) in the source dtype, `<module>` the name in the model transformers builds from config.json (for a GPT-2
  Conv1D, the factors of its nn.Linear orientation: A = (x -> R x) on its inputs either way).
- `adapter_config.json`: peft_type LORA, r = the largest rank, lora_alpha = r, `rank_pattern` and `alpha_pattern`
  mapping every module to its own rank, so PEFT's scaling alpha / r is 1 for each module; vLLM reads lora_alpha / r
  (= 1) and ignores the patterns, which gives the same. fan_in_fan_out is true when every target is a Conv1D (PEFT
  sets it per module anyway). bias "none", no dropout.

lsvd / lplr / dsvd conversions are refused: their factors are the whole weight (W = L R), so the base the adapter
would apply over is zero, which no base export or serving engine provides; such models load with `from_pretrained`,
`load_model` or `decompress`. In a mixed conversion their tensors are dense in the compressed-tensors base.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import constants as C
from ..dtypes import dtype_from_name
from ..errors import LplrError, opt
from ..io.outdir import output_path
from ..io.output import ConvertedOutput
from .common import (
    CONV1D,
    ExportPlan,
    ExportResult,
    Placement,
    exporting,
    plan_export,
    register_format,
    write_record,
)

__all__ = ["adapter_config", "export_peft", "lora_factors"]


def lora_factors(output: ConvertedOutput, p: Placement) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_A, lora_B) = (R: r x in, L: out x r) of `p`'s module in nn.Linear orientation, in the source dtype."""
    rec = p.rec
    parts = output.parts(rec)
    L, R = p.layout.left.dequantized(parts), p.layout.right.dequantized(parts)
    if p.kind == CONV1D and not rec.transposed:  # stored W (in x out) = L R, so the module computes x -> R^T (L^T x)
        L, R = R.T, L.T
    dtype = dtype_from_name(rec.dtype)
    return R.to(dtype).contiguous(), L.to(dtype).contiguous()


def adapter_config(plan: ExportPlan, ranks: dict[str, int], base_model: str | None) -> dict:
    """adapter_config.json for LoRA modules `ranks` (module -> rank) with scaling 1 for every module."""
    r = max(ranks.values())
    kinds = {p.kind for p in plan.placements if p.module in ranks}
    task = "CAUSAL_LM" if plan.architecture.endswith("ForCausalLM") else None
    return {"peft_type": "LORA", "task_type": task, "base_model_name_or_path": base_model, "revision": None,
            "r": r, "lora_alpha": r, "rank_pattern": dict(ranks), "alpha_pattern": dict(ranks),
            "target_modules": sorted(ranks), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": kinds == {CONV1D},
            "use_rslora": False, "use_dora": False, "init_lora_weights": True, "modules_to_save": None,
            "layers_to_transform": None, "layers_pattern": None, "inference_mode": True}


def _refusal(in_path, plan: ExportPlan) -> LplrError:
    methods = sorted({p.rec.method for p in plan.placements if p.rec.method != "copy"}) or ["copy"]
    return LplrError(f"{in_path} has no qlr weight with a low-rank correction on a linear layer (methods: "
                     f"{', '.join(methods)}); a LoRA adapter needs a base to apply over, and for lsvd/lplr/dsvd "
                     f"factors that base would be zero: load the conversion with from_pretrained or decompress it")


def _notes(plan: ExportPlan, base_model: str | None) -> list[str]:
    notes = [("apply over the compressed-tensors export of the same conversion (`lplr-convert export --format "
             "compressed-tensors`), which holds these modules' backbones Q")]
    if base_model is None:
        notes.append("base_model_name_or_path is unset: pass --base-model with that export's path or Hub repo id")
    folded = [p.rec.name for p in plan.placements if p.folded]
    if folded:
        notes.append(f"{len(folded)} qlr weights outside nn.Linear/Conv1D (first: {folded[0]}) are dense in the base "
                     f"with their corrections, not in the adapter")
    return notes


def _check_base_model(base_model: str | None) -> None:
    """`base_model` (the adapter's base_model_name_or_path) is a local directory or a Hub repo id OWNER/NAME."""
    if base_model is None or str(base_model).strip() and Path(str(base_model)).expanduser().is_dir():
        return
    from ..publish.hub import check_repo_id

    try:
        check_repo_id(base_model)
    except LplrError:
        raise LplrError(f"{opt('base_model')} {base_model!r} is neither a local directory nor a Hub repo id "
                        f"OWNER/NAME; pass the path or repo id of the dense export the adapter applies to") from None


def export_peft(in_path: str | Path, out_path: str | Path, base_model: str | None = None,
                overwrite: bool = False) -> ExportResult:
    """Write the qlr low-rank corrections of the conversion in `in_path` as a PEFT LoRA adapter in `out_path` (see
    the module docstring); `base_model` becomes base_model_name_or_path. With `overwrite`, only an earlier export in
    `out_path` is replaced."""
    from safetensors.torch import save_file

    _check_base_model(base_model)
    out = output_path(out_path)
    with ConvertedOutput(in_path) as output:
        plan = plan_export(output)
        targets = [p for p in plan.placements if p.adapter]
        if not targets:
            raise _refusal(in_path, plan)
        with exporting(output.root, out, overwrite, [C.PEFT_CONFIG_FILE, C.PEFT_WEIGHTS_FILE]):
            tensors, ranks = {}, {}
            for p in targets:
                A, B = lora_factors(output, p)
                stem = f"{C.PEFT_KEY_PREFIX}{p.module}"
                tensors[f"{stem}.lora_A.weight"], tensors[f"{stem}.lora_B.weight"] = A, B
                ranks[p.module] = A.shape[0]
            save_file(tensors, str(out / C.PEFT_WEIGHTS_FILE), metadata={C.META_FORMAT_KEY: C.META_FORMAT_VALUE})
            (out / C.PEFT_CONFIG_FILE).write_text(json.dumps(adapter_config(plan, ranks, base_model), indent=2) + "\n",
                                                  encoding="utf-8")
            result = ExportResult(out, C.PEFT_EXPORT, str(output.root), adapter=ranks, notes=_notes(plan, base_model),
                                  files=[C.PEFT_CONFIG_FILE, C.PEFT_WEIGHTS_FILE])
            write_record(result)
    return result


@register_format(C.PEFT_EXPORT)
def _export(in_path, out_path, *, base_model=None, max_shard_size=None, overwrite=False):
    return export_peft(in_path, out_path, base_model, overwrite)
