#!/usr/bin/env python
"""Resident memory while loading a converted directory (issue 21, item 2: the peak RSS while loading stays below the
stored bytes plus the largest decoded tensor plus the interpreter and torch).

In this process: the imports, the model class and config are loaded first, then a warm-up load of the same directory
is dropped (first-use kernels and torch's code pages land in the baseline, not in the load), the kernel's peak counter
is reset (/proc/self/clear_refs) and the directory is loaded again by `lplr_convert.load_model(DIR, dtype=...)` or
`AutoModelForCausalLM.from_pretrained(DIR, dtype=...)` after `import lplr_convert`. Prints one JSON line: the baseline
RSS, the peak and the RSS after loading above it (and their anonymous / file-backed shares), the model's parameter and
buffer bytes, the bound (the shards' tensor bytes plus the largest tensor the manifest records, decoded in its source
dtype), and the same after one forward of 4 tokens (`--forward`: file-backed pages of a memory map show up when used).

Usage::

    python scripts/bench_load_memory.py DIR --loader load-model --dtype bfloat16 [--no-warm-up] [--forward]

Run each configuration in its own process (the numbers are those of this process).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import proc_status, reset_peak_rss


def bound_bytes(root: Path) -> tuple[int, int]:
    """(stored tensor bytes, bytes of the largest tensor decoded in its source dtype) from the manifest."""
    from lplr_convert.dtypes import dtype_from_name
    from lplr_convert.io.manifest import read_manifest

    tensors = read_manifest(root)["tensors"]
    stored = sum(int(meta["bytes"]) for r in tensors for meta in r["stored"].values())
    largest = max(math.prod(r["shape"]) * dtype_from_name(r["dtype"]).itemsize for r in tensors)
    return stored, largest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path", type=Path)
    ap.add_argument("--loader", choices=["load-model", "from-pretrained"], default="load-model")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--no-warm-up", action="store_true")
    ap.add_argument("--forward", action="store_true")
    args = ap.parse_args()

    import torch
    import transformers

    import lplr_convert
    from lplr_convert.hf.modeling import model_class

    dtype = getattr(torch, args.dtype)
    model_class(args.path)  # the model's modules imported

    def load():
        if args.loader == "load-model":
            return lplr_convert.load_model(args.path, dtype=dtype)
        return transformers.AutoModelForCausalLM.from_pretrained(args.path, dtype=dtype)

    if not args.no_warm_up:
        model = load()
        del model
    gc.collect()
    base = proc_status()
    reset = reset_peak_rss()
    t0 = time.perf_counter()
    model = load()
    seconds = time.perf_counter() - t0
    after = proc_status()
    stored, largest = bound_bytes(args.path)
    rec = {"path": str(args.path), "loader": args.loader, "dtype": args.dtype, "warm_up": not args.no_warm_up,
           "peak_reset": reset, "load_seconds": round(seconds, 2), "rss_base": base["VmRSS"],
           "peak_over_base": after["VmHWM"] - base["VmRSS"], "after_over_base": after["VmRSS"] - base["VmRSS"],
           "anon_after_over_base": after["RssAnon"] - base["RssAnon"],
           "file_after_over_base": after["RssFile"] - base["RssFile"],
           "held": sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]),
           "stored": stored, "largest_decoded": largest, "bound": stored + largest}
    if args.forward:
        with torch.no_grad():
            model(input_ids=torch.tensor([[1, 2, 3, 4]]))
        st = proc_status()
        rec |= {"after_forward_over_base": st["VmRSS"] - base["VmRSS"], "peak_forward_over_base": st["VmHWM"] -
                base["VmRSS"]}
    print(json.dumps(rec))


if __name__ == "__main__":
    main()
