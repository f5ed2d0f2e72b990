"""Helpers shared by the export tests (a uniquely named module, so it never collides with a conftest)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lplr_convert import constants as C
from lplr_convert.dtypes import dtype_from_name
from lplr_convert.io.manifest import read_manifest
from lplr_convert.math import quantize as qz
from lplr_convert.hf.modeling import LowRankLinear


def convert_to(src: Path, out: Path, method: str = "rtn", recipe: str | None = None, layers: str | None = None,
               types: str | None = None, **knobs) -> Path:
    """Convert through the library (no calibration: gptq and qlr then use H = I)."""
    from lplr_convert.pipeline.convert import ConvertOptions, convert

    recipe_path = None
    if recipe is not None:
        recipe_path = out.parent / f"{out.name}_recipe.yaml"
        recipe_path.write_text(recipe)
    convert(ConvertOptions(in_path=str(src), out_path=str(out), layer={"method": method, **knobs},
                           recipe=None if recipe_path is None else str(recipe_path), layers=layers, types=types,
                           device="cpu",
                           write_report=False))
    return out


def record_of(out) -> dict:
    return json.loads((out / C.EXPORT_FILE).read_text(encoding="utf-8"))


def _specs(dst) -> dict[str, qz.QuantSpec]:
    """Record name -> the spec of its stored full-size quantized matrix (rtn, gptq, qlr's backbone)."""
    return {t["name"]: qz.QuantSpec.from_json(t["info"]["q"]) for t in read_manifest(dst)[C.M_TENSORS]
            if t["info"].get("q")}


def rounded_reference(case, factored: bool = False, drop_corrections: bool = False):
    """The tool's own model (`load_model`) with each packed weight (qlr: its backbone) rounded to the precision
    compressed-tensors decodes it in: the scale's stored dtype with dequantize=True (it computes (q - z) * s there),
    else the model's dtype (float32 here: the scales load into float32 parameters, so nothing is rounded). Packed
    per-expert weights that transformers fuses into 3-D parameters are always decoded in the scale dtype (its experts
    path, which also leaves them in that dtype); every fused experts parameter is then made of packed experts only
    (the export refuses anything else)."""
    from lplr_convert import load_model

    model = load_model(case.dst, factored=factored)
    specs = _specs(case.dst)
    modules = dict(model.named_modules())
    experts_dtype = None
    for name in record_of(case.ct)["packed"]:
        mod = modules.get(name.removesuffix(".weight"))
        if mod is None:  # a per-expert weight of a fused parameter
            experts_dtype = dtype_from_name(specs[name].scale_dtype)
            continue
        param = mod.base if isinstance(mod, LowRankLinear) else mod.weight
        work = dtype_from_name(specs[name].scale_dtype) if case.dequantize else param.dtype
        param.data = param.data.to(work).to(param.dtype)
    for param in model.parameters():  # transformers keeps them in that dtype (float16 experts in a float32 model)
        if experts_dtype is not None and param.dim() == 3:
            param.data = param.data.to(experts_dtype)
    if drop_corrections:  # each qlr layer as the nn.Linear of its backbone alone, as the base holds it
        from lplr_convert.hf.modeling import set_module

        for name, mod in list(model.named_modules()):
            if isinstance(mod, LowRankLinear):
                linear = torch.nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
                linear.weight.data, linear.bias = mod.base.data, mod.bias
                set_module(model, name, linear)
    return model


def forward(model, ids):
    ids = torch.tensor(ids)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


