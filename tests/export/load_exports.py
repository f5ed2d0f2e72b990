"""Run by the export tests in a fresh interpreter: load each export with transformers (+ compressed-tensors) and
peft alone, never importing lplr_convert, and save what the tests compare.

argv[1]: a JSON list of jobs {base, adapter (or null), auto (transformers class), dequantize, input_ids, result}.
Prints one JSON line: {"lplr_modules": [...]} (the lplr_convert modules this process ended up importing).
"""

from __future__ import annotations

import json
import sys

import torch
import transformers


def _base_weights(model) -> dict[str, torch.Tensor]:
    """The base model's weights (and fused experts parameters) under the base model's own names (PEFT's base_layer
    level removed)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {n.replace(".base_layer", ""): p.detach().clone() for n, p in base.named_parameters()
            if (n.endswith(".weight") or p.dim() == 3) and "lora_" not in n}


def run(job: dict) -> None:
    kwargs = {}
    if job["dequantize"]:
        kwargs["quantization_config"] = transformers.CompressedTensorsConfig(dequantize=True)
    model = getattr(transformers, job["auto"]).from_pretrained(job["base"], **kwargs).eval()
    scalings = []
    if job["adapter"]:
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer

        model = PeftModel.from_pretrained(model, job["adapter"]).eval()
        scalings = sorted({float(s) for m in model.modules() if isinstance(m, LoraLayer) for s in m.scaling.values()})
    ids = torch.tensor(job["input_ids"])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    output = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    torch.save({"output": output, "weights": _base_weights(model), "scalings": scalings,
                "class": type(model).__name__}, job["result"])


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as f:
        jobs = json.load(f)
    for job in jobs:
        run(job)
    print(json.dumps({"lplr_modules": sorted(m for m in sys.modules if m.split(".")[0] == "lplr_convert")}))
