#!/usr/bin/env python
"""HQQ and llm-compressor's GPTQ on a causal LM, measured exactly as `scripts/quality.py --model` measures the tool.

Same held-out prose and evaluation (`quality.prose_texts` + `lplr_convert.evaluate.evaluate_state_dict`: perplexity
and mean per-token KL to the float model, one paragraph a context), same weights (the tensors the tool compresses by
default, from its own plan), same weight / output errors (`quality.tensor_errors`, the output error against the
calibration statistics given by --stats), rows appended to the same results.jsonl / results.md (`--write`).

- HQQ (`--peer hqq`, configs NBITS:GROUP): `HQQLinear(BaseQuantizeConfig(nbits, group_size))`, its defaults (axis 1,
  asymmetric with float16 scale and zero per group, 20-step half-quadratic optimisation, zero rounded at 4 bits), no
  calibration, compute dtype float16 (the dtype HQQ stores its meta in); the weights evaluated are its `dequantize()`.
  Bits/param = bytes of W_q (as packed by HQQ: 3-bit packs ten codes in an int32, 3.2 bits a code) + scale + zero
  over the parameters.
- llm-compressor (`--peer llmcompressor`, `--schemes`, `--pipelines`): `oneshot` with `GPTQModifier(targets=
  ['Linear'], ignore=['lm_head'], scheme=...)` on the calibration the tool's `calibrate` uses by default (the shipped
  text, `--samples` chunks of `--seq-len` tokens, tokenized by `lplr_convert.calibration.text.tokenize`), batch size 1;
  the weights evaluated are the fake-quantized weights it leaves in memory; bits/param from what its compressed save
  writes (weight_packed + weight_scale (+ weight_zero_point)).

Neither is a dependency of lplr-convert: run from a venv that has them, with this worktree on PYTHONPATH, e.g.

    PYTHONPATH=$PWD /work/cache/peers-venv/bin/python scripts/decoder_peers.py --peer hqq \\
        --model /work/cache/smollm2-135m --stats STATS --configs 4:64,3:128,2:128 --write artifacts/quality/decoder
    PYTHONPATH=$PWD /work/cache/llmc-venv/bin/python scripts/decoder_peers.py --peer llmcompressor \\
        --model /work/cache/smollm2-135m --stats STATS --schemes W4A16 --pipelines basic,sequential \\
        --write artifacts/quality/decoder
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent
# the budget of the tool's table each peer row stands beside (nearest stored bits)
BUDGET_OF_BITS = {4: 4.25, 3: 3.25, 2: 2.25}


def _quality():
    spec = importlib.util.spec_from_file_location("lplr_quality", ROOT / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _versions(names: tuple[str, ...]) -> dict:
    out = {}
    for dist in names:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def tool_targets(src: str) -> list[str]:
    """Names of the tensors the tool compresses by default (its plan; nothing is converted)."""
    from lplr_convert.methods import flat_defaults
    from lplr_convert.methods.base import overlay
    from lplr_convert.pipeline.convert import ConvertOptions
    from lplr_convert.pipeline.inspect import inspect_checkpoint

    opts = ConvertOptions(in_path=src, out_path=str(Path(tempfile.gettempdir()) / "unused"),
                          layer=overlay(flat_defaults(), {"method": "rtn"}), device="cpu", write_report=False)
    return sorted(r["name"] for r in inspect_checkpoint(opts)["tensors"] if r["method"] != "copy")


def _evaluate(q, src: str, stats: str, texts: list[str], dense: dict) -> dict:
    """Perplexity / KL of the float model carrying `dense` (name -> float weight), and the weight / output errors."""
    import torch
    from safetensors import safe_open

    from lplr_convert.evaluate import evaluate_state_dict

    ev = evaluate_state_dict(src, dense, texts, "cpu", 10**9, required=set(dense))
    originals = {}
    for f in sorted(Path(src).glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            originals.update({k: h.get_tensor(k) for k in h.keys() if k in dense})  # noqa: SIM118
    werr, oerr, _ = q.tensor_errors(((n, originals[n].to(torch.float32), dense[n].to(torch.float32), None)
                                     for n in sorted(dense)), stats)
    return {"perplexity_float": ev["perplexity_original"], "perplexity": ev["perplexity_converted"],
            "ppl_ratio": ev["perplexity_converted"] / ev["perplexity_original"], "kl_mean": ev["kl_mean"],
            "top1_agreement": ev["top1_agreement"], "weighted_rel_error": werr, "output_rel_error": oerr,
            "tokens": ev["tokens"], "tensors_loaded": ev["tensors_loaded"]}


def run_hqq(src: str, targets: list[str], nbits: int, group: int) -> tuple[dict, dict]:
    """(name -> dequantized float32 weight, row fields) of HQQ at nbits / group on every target."""
    import torch
    from hqq.core.quantize import BaseQuantizeConfig, HQQBackend, HQQLinear
    from safetensors import safe_open

    HQQLinear.set_backend(HQQBackend.PYTORCH)
    cfg = BaseQuantizeConfig(nbits=nbits, group_size=group)
    dense, stored, params = {}, 0, 0
    t0 = time.perf_counter()
    for f in sorted(Path(src).glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for name in [k for k in h.keys() if k in targets]:  # noqa: SIM118
                W = h.get_tensor(name).to(torch.float32)
                lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
                lin.weight.data.copy_(W)
                q = HQQLinear(lin, cfg, compute_dtype=torch.float16, device="cpu", del_orig=True)
                dense[name] = q.dequantize().to(torch.float32)
                stored += sum(t.numel() * t.element_size() for t in (q.W_q, q.meta["scale"], q.meta["zero"]))
                params += W.numel()
    seconds = time.perf_counter() - t0
    if sorted(dense) != sorted(targets):
        raise RuntimeError(f"HQQ quantized {len(dense)} tensors, the tool compresses {len(targets)}")
    return dense, {"bits_per_param": 8 * stored / params, "convert_seconds": round(seconds, 1),
                   "settings": {"nbits": nbits, "group_size": group, "axis": 1, "compute_dtype": "float16",
                                "optimize": True, "round_zero": nbits == 4}}


def run_llmc(src: str, targets: list[str], scheme: str, group: int | None, pipeline: str, samples: int,
             seq_len: int, keep: Path) -> tuple[dict, dict]:
    """(name -> fake-quantized float32 weight, row fields) of llm-compressor's GPTQ with a preset scheme, its group
    size replaced by `group` when given (W4A16's 128 divides no 576-wide SmolLM2 input: llm-compressor refuses it)."""
    import torch
    from compressed_tensors.quantization import preset_name_to_scheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from lplr_convert.calibration.text import default_text, load_tokenizer, tokenize

    tok = load_tokenizer(Path(src))
    seqs = tokenize(tok, default_text(True).lines, True, samples, seq_len)
    ds = Dataset.from_dict({"input_ids": seqs, "attention_mask": [[1] * len(s) for s in seqs]})
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    if group is None:
        modifier = GPTQModifier(targets=["Linear"], scheme=scheme, ignore=["lm_head"])
    else:
        qscheme = preset_name_to_scheme(scheme, ["Linear"])
        qscheme.weights.group_size = group
        modifier = GPTQModifier(config_groups={"group_0": qscheme}, ignore=["lm_head"])
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=modifier, tokenizer=tok, num_calibration_samples=len(ds),
            max_seq_length=seq_len, shuffle_calibration_samples=False, batch_size=1, pipeline=pipeline)
    seconds = time.perf_counter() - t0
    mods = dict(model.named_modules())
    quantized = sorted(n for n, m in mods.items() if getattr(m, "quantization_scheme", None) is not None)
    if sorted(n + ".weight" for n in quantized) != sorted(targets):
        raise RuntimeError(f"llm-compressor quantized {len(quantized)} modules, the tool compresses {len(targets)}")
    w = mods[quantized[0]].quantization_scheme.weights
    dense = {n + ".weight": mods[n].weight.detach().to(torch.float32).clone() for n in quantized}
    out = keep / f"{scheme}-{pipeline}"
    model.save_pretrained(str(out), save_compressed=True)
    stored, params = 0, sum(t.numel() for t in dense.values())
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():  # noqa: SIM118
                mod, _, field = k.rpartition(".")
                if mod in quantized and field in ("weight_packed", "weight_scale", "weight_zero_point"):
                    t = h.get_tensor(k)
                    stored += t.numel() * t.element_size()
    return dense, {"bits_per_param": 8 * stored / params, "convert_seconds": round(seconds, 1),
                   "settings": {"scheme": scheme, "pipeline": pipeline, "num_bits": w.num_bits,
                                "group_size": w.group_size, "symmetric": w.symmetric, "actorder": str(w.actorder),
                                "observer": w.observer, "dampening_frac": modifier.dampening_frac,
                                "calibration_samples": len(ds), "calibration_tokens": sum(len(s) for s in seqs)}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peer", required=True, choices=("hqq", "llmcompressor"))
    ap.add_argument("--model", required=True, help="a causal-LM checkpoint directory (safetensors)")
    ap.add_argument("--stats", required=True, help="the tool's calibration statistics (output errors)")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--text", type=Path, default=None)
    ap.add_argument("--configs", default="4:64,3:128,2:128", help="hqq: NBITS:GROUP, comma separated")
    ap.add_argument("--schemes", default="W4A16", help="llmcompressor: preset schemes, comma separated")
    ap.add_argument("--group-size", type=int, default=64,
                    help="llmcompressor: replaces the presets' group size (0: keep it; W4A16's 128 does not divide "
                         "SmolLM2's 576-wide inputs)")
    ap.add_argument("--pipelines", default="basic,sequential", help="llmcompressor: calibration pipelines")
    ap.add_argument("--samples", type=int, default=128, help="llmcompressor: calibration samples")
    ap.add_argument("--seq-len", type=int, default=512, help="llmcompressor: tokens per sample")
    ap.add_argument("--write", type=Path, default=None, help="append rows to DIR/results.jsonl, re-render results.md")
    args = ap.parse_args(argv)
    from loguru import logger

    q = _quality()
    logger.remove()
    logger.add(sys.stderr, level=os.environ.get("LOGURU_LEVEL", "WARNING"))
    src = args.model
    targets = tool_targets(src)
    texts, tokens = q.prose_texts(src, args.text or q.PROSE, args.eval_tokens)
    names = ("hqq",) if args.peer == "hqq" else ("llmcompressor", "compressed-tensors", "datasets")
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "model": src, "calibration": "none (HQQ)" if args.peer == "hqq" else
            f"{args.samples} x {args.seq_len} tokens of the shipped text (llm-compressor)",
            "text": (args.text or q.PROSE).name, "paragraphs": len(texts), "tokens": tokens, "venv": sys.prefix,
            "versions": _versions((*names, "torch", "transformers"))}
    if args.peer == "hqq":
        jobs = [(f"HQQ {b}-bit g{g} (no calibration)", int(b), lambda b=int(b), g=int(g): run_hqq(src, targets, b, g))
                for b, g in (c.split(":") for c in args.configs.split(",") if c)]
    else:
        keep = Path(tempfile.mkdtemp(prefix="llmc_dec_"))
        group = args.group_size or None
        jobs = [(f"llm-compressor GPTQ {s}{f' g{group}' if group else ''} ({p})", int(s[1]),
                 lambda s=s, p=p: run_llmc(src, targets, s, group, p, args.samples, args.seq_len, keep))
                for p in args.pipelines.split(",") if p for s in args.schemes.split(",") if s]
    for label, bits, job in jobs:
        load0 = os.getloadavg()[0]
        try:
            dense, fields = job()
            rec = {"label": label, "budget": BUDGET_OF_BITS.get(bits), "source": args.peer, "calibrated":
                   args.peer != "hqq", **fields, **_evaluate(q, src, args.stats, texts, dense)}
            rec["load"] = [round(load0, 1), round(os.getloadavg()[0], 1)]
        except Exception as e:  # noqa: BLE001  (report the failure, keep the other rows)
            rec = {"label": label, "budget": BUDGET_OF_BITS.get(bits), "source": args.peer,
                   "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        print(json.dumps(rec), flush=True)
        q.write_llm_rows(args.write, meta, [rec])
    if args.peer == "llmcompressor":
        shutil.rmtree(keep, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
