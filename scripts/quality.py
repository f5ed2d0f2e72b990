#!/usr/bin/env python
"""Quality benchmark: method x budget -> stored bits/param and embedding cosine on all-MiniLM-L6-v2.

The bundled checkpoint is calibrated once on the calibration text shipped in the package, then converted with each
configuration below, and the converted model's sentence embeddings are compared with the original's on a different
text (scripts/data/heldout_sentences.txt, 420 held-out sentences by default). Bits/param counts every stored byte
of the compressed tensors (codes, scales, zero points, factors), read from the manifest. Baselines (rtn, gptq) run
in the same process, on the same statistics and text. llm-compressor's GPTQ is not a dependency; it is not run here
(scripts/llmcompressor_baseline.py runs it, from a separate venv, on the same text and evaluation).

    .venv/bin/python scripts/quality.py                      # full table (~15 min on 2 cores)
    .venv/bin/python scripts/quality.py --quick              # four rows (~2 min)
    .venv/bin/python scripts/quality.py --write artifacts/quality
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
ROOT = Path(__file__).resolve().parent
DEFAULT_TEXT = ROOT / "data" / "heldout_sentences.txt"
BUDGETS = (2.25, 3.25, 4.25, 8.25)

# (label, calibrated, flat settings): each budget row converts with --target-bits-per-param B.
PER_BUDGET = [
    ("rtn g128 (baseline)", False, {"method": "rtn", "quantizer": "group", "group_size": 128}),
    ("gptq W-sym g128 (baseline)", True, {"method": "gptq"}),
    ("gptq asym+mse g128 (baseline)", True, {"method": "gptq", "scheme": "asymmetric", "clip": "mse"}),
    ("qlr", True, {"method": "qlr"}),
    ("lsvd calibrated, 4/4", True, {"method": "lsvd", "b1": 4, "b2": 4}),
    ("lplr, 4/4 (no calibration)", False, {"method": "lplr", "b1": 4, "b2": 4}),
]
FIXED = [
    ("lplr rf 0.8, 8/8, published grid", False, {"method": "lplr", "scheme": "minmax", "sketch_precision": "float32"}),
    ("lsvd rf 0.8, 8/8, published grid", False, {"method": "lsvd", "scheme": "minmax"}),
    ("lsvd rf 0.8, 8/8, calibrated", True, {"method": "lsvd"}),
    ("rtn 8-bit per channel", False, {"method": "rtn", "b0": 8}),
    ("rtn 4-bit per channel, published grid", False, {"method": "rtn", "b0": 4, "scheme": "minmax"}),
]
QUICK = [("qlr", 4.25), ("gptq W-sym g128 (baseline)", 4.25), ("qlr", 2.25), ("lsvd rf 0.8, 8/8, calibrated", None)]


def _configs(quick: bool) -> list[tuple[str, bool, dict, float | None]]:
    rows = [(label, cal, layer, b) for b in BUDGETS for label, cal, layer in PER_BUDGET]
    rows += [(label, cal, layer, None) for label, cal, layer in FIXED]
    if quick:
        rows = [r for r in rows if (r[0], r[3]) in QUICK]
    return rows


def _run(src: str, stats: str, text: Path, label: str, calibrated: bool, layer: dict, budget: float | None) -> dict:
    from lplr_convert.pipeline.convert import ConvertOptions, convert
    from lplr_convert.evaluate import evaluate_state_dict
    from lplr_convert.io.output import ConvertedOutput
    from lplr_convert.methods import flat_defaults
    from lplr_convert.methods.base import overlay

    flat = overlay(flat_defaults(), layer)
    out = Path(tempfile.mkdtemp(prefix="lplr_quality_")) / "out"
    t0 = time.perf_counter()
    manifest = convert(ConvertOptions(in_path=src, out_path=str(out), layer=flat, calibration=stats if calibrated else None, device="cpu",
                                      target_bits_per_param=budget, write_report=False))
    seconds = time.perf_counter() - t0
    with ConvertedOutput(out) as o:
        ev = evaluate_state_dict(src, o.iter_dense(), str(text), "cpu", 10_000)
    s = manifest["summary"]
    return {"label": label, "budget": budget, "calibrated": calibrated, "settings": layer,
            "bits_per_param": s["compressed_bits_per_param"], "cosine_mean": ev["cosine_mean"],
            "cosine_min": ev["cosine_min"], "neighbour_kept": ev["neighbour_kept"],
            "weighted_rel_error": s["weighted_rel_error"], "output_rel_error": s.get("output_rel_error"),
            "convert_seconds": round(seconds, 1), "texts": ev["texts"]}


def _markdown(records: list[dict], meta: dict) -> str:
    lines = ["# Quality per bit: all-MiniLM-L6-v2", "",
             (f"Measured {meta['date']} on {meta['machine']}. Calibration: {meta['calibration']}. Evaluation: mean "
             f"cosine of normalised sentence embeddings, converted vs original, over {meta['texts']} held-out "
             f"sentences ({meta['text']}); \"nn kept\" = share whose nearest neighbour is unchanged. Bits/param = "
             "every stored byte of the compressed tensors (codes, scales, zero points, factors) over their "
             "parameters. Budget rows use `--target-bits-per-param B`."), "",
             "| budget | method | bits/param | cosine | min cosine | nn kept | output error | convert s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        out_err = "—" if r["output_rel_error"] is None else f"{r['output_rel_error']:.4f}"
        budget = "—" if r["budget"] is None else f"≤ {r['budget']:g}"
        lines.append(f"| {budget} | {r['label']} | {r['bits_per_param']:.3f} | {r['cosine_mean']:.4f} | "
                     f"{r['cosine_min']:.4f} | {r['neighbour_kept']:.3f} | {out_err} | {r['convert_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="four rows only")
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="evaluation text, one sentence per line")
    ap.add_argument("--samples", type=int, default=560, help="calibration samples (lines of the shipped text)")
    ap.add_argument("--write", type=Path, default=None, help="write results.jsonl and results.md here")
    args = ap.parse_args(argv)
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level=os.environ.get("LOGURU_LEVEL", "WARNING"))
    from lplr_convert.calibration import calibrate
    from lplr_convert.io.reader import resolve_source

    src = str(resolve_source("bundled:all-MiniLM-L6-v2")[0])
    stats = str(Path(tempfile.mkdtemp(prefix="lplr_quality_stats_")) / "stats")
    cal = calibrate(src, stats, samples=args.samples, seq_len=128, batch_size=16)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "calibration": f"{cal['samples']} samples, {cal['tokens']} tokens of the shipped calibration text",
            "text": args.text.name, "texts": None}
    records = []
    for label, calibrated, layer, budget in _configs(args.quick):
        rec = _run(src, stats, args.text, label, calibrated, layer, budget)
        meta["texts"] = rec["texts"]
        records.append(rec)
        print(json.dumps(rec), flush=True)
    if args.write is not None:
        args.write.mkdir(parents=True, exist_ok=True)
        (args.write / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [{"meta": meta}, *records]))
        (args.write / "results.md").write_text(_markdown(records, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
