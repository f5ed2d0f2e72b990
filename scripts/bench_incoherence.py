#!/usr/bin/env python
"""Decode cost of `--incoherence hadamard` in the packed runtime: a PackedLinear of a gptq 4-bit g128 weight with
and without the transform (y = U^T (Q' (V x))), one token and a short prefill, float32 (tiled kernel) and bfloat16
(int4pack on a CPU), per matrix shape; plus the two transforms alone. Medians of interleaved repeats in one process:
the ratios are what to read (the machine may be shared; its load average is recorded).

    .venv/bin/python scripts/bench_incoherence.py --write artifacts/quality/incoherence/bench.json

With `--model PATH --stats DIR` it instead measures the quality side per tensor, cheaply: the relative output error
sqrt(tr(D H D^T) / tr(W H W^T)) of gptq (defaults: symmetric g128, act order) with and without the transform, at
each of `--bits`, for the block linears of `--layers`, against the calibration statistics in DIR.

    .venv/bin/python scripts/bench_incoherence.py --model /work/cache/smollm2-135m --stats /tmp/smol-stats \
        --layers 0,15,29 --write artifacts/quality/incoherence/tensor_errors.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch


def _timed(fn, repeats: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def bench(shape: tuple[int, int], tokens: int, dtype: torch.dtype, rounds: int) -> dict:
    from lplr_convert.methods import get_method, make_settings
    from lplr_convert.runtime.modules import PackedLinear

    m, n = shape
    W = torch.randn(m, n, generator=torch.Generator().manual_seed(0)) / n ** 0.5
    gptq = get_method("gptq")
    mods = {}
    for kind in ("none", "hadamard"):
        res = gptq.compress(W, make_settings("gptq", incoherence=kind), seed=1)
        mods[kind] = PackedLinear(gptq.layout(res.info), res.parts, dtype=dtype)
    x = torch.randn(tokens, n, generator=torch.Generator().manual_seed(2)).to(dtype)
    T = mods["hadamard"].transform
    calls = {"plain": lambda: mods["none"](x), "hadamard": lambda: mods["hadamard"](x),
             "transforms only": lambda: T.out.apply_t(T.inp.apply(x.float()))}
    repeats = max(3, int(2e8 / (m * n * tokens)))
    times = {k: [] for k in calls}
    with torch.no_grad():
        for _ in range(rounds):  # interleaved, so a burst of load hits every variant
            for k, fn in calls.items():
                times[k].append(_timed(fn, repeats))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"shape": list(shape), "tokens": tokens, "dtype": str(dtype).removeprefix("torch."),
            "kernel": mods["none"].kernels[0], "us": {k: round(v * 1e6, 1) for k, v in med.items()},
            "ratio": round(med["hadamard"] / med["plain"], 3)}


def tensor_errors(model: str, stats_dir: str, layers: list[int], bits: list[int], method: str) -> list[dict]:
    """Per block linear of `layers`: the relative output error of `method` at each width, plain and +hadamard."""
    import re

    from lplr_convert.calibration import load_calibration
    from lplr_convert.io.reader import open_source
    from lplr_convert.math.sketch import derive_seed
    from lplr_convert.math.weighted import weighted_relative_error
    from lplr_convert.methods import InputStats, get_method, make_settings

    stats = load_calibration(stats_dir)
    src = open_source(model)
    pattern = re.compile(rf"layers\.({'|'.join(map(str, layers))})\..*_proj\.weight$")
    names = sorted((n for n in stats.weights if pattern.search(n)), key=lambda n: (int(n.split(".")[2]), n))
    m = get_method(method)
    rows = []
    for name, W in src.iter_tensors(names):
        W = W.float()
        st = InputStats(stats.statistic(name).float(), key=name)
        row = {"name": name, "shape": list(W.shape)}
        for b in bits:
            for kind in ("none", "hadamard"):
                res = m.compress(W, make_settings(method, b0=b, incoherence=kind), derive_seed(0, name), st)
                W_hat = m.decode(res.parts, res.info)
                row[f"{b}-bit {kind}"] = round(float(weighted_relative_error(W, W_hat, st.H)), 5)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--write", type=Path, default=None)
    ap.add_argument("--model", default=None, help="per-tensor output errors of this checkpoint (with --stats)")
    ap.add_argument("--stats", default=None, help="its `lplr-convert calibrate` output")
    ap.add_argument("--layers", default="0,15,29")
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--method", default="gptq")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()[0]
    if args.model:
        rows = tensor_errors(args.model, args.stats, [int(x) for x in args.layers.split(",")],
                             [int(b) for b in args.bits.split(",")], args.method)
        keys = [k for k in rows[0] if "bit" in k]
        mean = {k: round(statistics.mean(r[k] for r in rows), 5) for k in keys}
        meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "threads": args.threads, "model": args.model,
                "stats": args.stats, "method": args.method, "mean": mean,
                "load": [round(load0, 1), round(os.getloadavg()[0], 1)]}
        print(json.dumps(meta))
        if args.write:
            args.write.parent.mkdir(parents=True, exist_ok=True)
            args.write.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
        return 0
    rows = []
    for shape in ((4096, 4096), (576, 576)):
        for dtype in (torch.float32, torch.bfloat16):
            for tokens in (1, 16):
                row = bench(shape, tokens, dtype, args.rounds)
                rows.append(row)
                print(json.dumps(row), flush=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "threads": args.threads, "torch": torch.__version__,
            "load": [round(load0, 1), round(os.getloadavg()[0], 1)], "cores": os.cpu_count()}
    print(json.dumps(meta))
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
