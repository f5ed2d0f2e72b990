#!/usr/bin/env python
"""Sequential against plain calibration on a causal LM: perplexity and KL of the same conversion, calibrated either
way, on held-out prose.

Plain: every block's statistics from the original model's hidden states. Sequential (`calibrate --sequential`): each
block's from the outputs of the blocks before it carrying their compressed weights. Both convert with the same
settings (a recipe file, default gptq symmetric g128 at --b0 3) and are evaluated with `lplr_convert.evaluate` on
scripts/data/heldout_sentences.txt.

    .venv/bin/python scripts/sequential_calibration.py --model /path/to/smollm2-135m --samples 32 --write DIR
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
ROOT = Path(__file__).resolve().parent


def main() -> None:
    from lplr_convert.calibration import calibrate
    from lplr_convert.evaluate import evaluate
    from lplr_convert.pipeline.convert import ConvertOptions, convert
    from lplr_convert.pipeline.sequential import CompressedBlocks

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="causal LM directory")
    ap.add_argument("--recipe-defaults", default='{"method": "gptq", "b0": 3}',
                    help="JSON of the recipe's defaults (the conversion's settings)")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-texts", type=int, default=420)
    ap.add_argument("--write", type=Path, default=None, help="append the result (JSON line) to DIR/results.jsonl")
    args = ap.parse_args()
    heldout = ROOT / "data" / "heldout_sentences.txt"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "recipe.json"
        recipe.write_text(json.dumps({"defaults": json.loads(args.recipe_defaults)}), encoding="utf-8")
        for mode in ("plain", "sequential"):
            stats, out = Path(tmp) / f"stats-{mode}", Path(tmp) / f"conv-{mode}"
            opts = ConvertOptions(in_path=args.model, out_path=str(out), recipe=str(recipe), calibration=str(stats),
                                  write_report=False, device="cpu")
            t0 = time.perf_counter()
            calibrate(args.model, stats, samples=args.samples, seq_len=args.seq_len, device="cpu",
                      sequential=CompressedBlocks(opts) if mode == "sequential" else None)
            t1 = time.perf_counter()
            doc = convert(opts)
            t2 = time.perf_counter()
            ev = evaluate(args.model, out, text=heldout, device="cpu", max_texts=args.max_texts)
            row = {"mode": mode, "settings": json.loads(args.recipe_defaults), "samples": args.samples,
                   "seq_len": args.seq_len, "calibrate_s": round(t1 - t0, 1), "convert_s": round(t2 - t1, 1),
                   "bits_per_param": doc["summary"].get("bits_per_param"), **{k: v for k, v in ev.items()
                                                                              if isinstance(v, (int, float))}}
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.write:
        args.write.mkdir(parents=True, exist_ok=True)
        with open(args.write / "results.jsonl", "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps({**row, "machine": platform.processor() or platform.machine(),
                                    "when": time.strftime("%Y-%m-%d %H:%M")}) + "\n")


if __name__ == "__main__":
    main()
