"""Kernel micro-benchmark for the packed runtime (lplr_convert.runtime.kernels): x @ W^T for one weight, decode (1
token) and prefill (512 tokens), tiled dequantize-then-matmul vs torch's CPU int4pack / int8pack kernels vs dense
float32 / bfloat16 matmul. Best of `--reps` after a warm-up; prints a table and writes JSON.

    PYTHONPATH=. python scripts/bench_kernels.py --out artifacts/runtime_kernels/kernels.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from lplr_convert.math import quantize as qz
from lplr_convert.runtime import kernels as K

SLOW_PREFILL = ("int4pack_fp32_sz_per_call", "int4pack_fp32_sz_cached", "int8pack_fp32")
SHAPES = [(1536, 576), (576, 1536), (11008, 4096), (4096, 11008)]


def best(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def variants(m: int, n: int):
    W = torch.randn(m, n, generator=torch.Generator().manual_seed(0)) * 0.02
    spec4 = qz.QuantSpec((m, n), 4, "group", 0, 128, scheme="asymmetric", scale_dtype="float16")
    q4 = qz.quantize_spec(W, spec4)
    f4 = qz.to_fields(q4)
    spec8 = qz.QuantSpec((m, n), 8, "channel", 0, scheme="asymmetric", scale_dtype="float16")
    q8 = qz.quantize_spec(W, spec8)
    f8 = qz.to_fields(q8)
    D = qz.dequantize(q4)
    Db = D.bfloat16()
    seg = K.int4pack_segments(q4.spec)
    w4 = K.int4pack_weight(f4["packed"], q4.spec, seg)
    sz32 = K.int4pack_scales_zeros(q4.spec, f4, seg, torch.float32)
    w8 = K.int8pack_weight(f8["packed"], q8.spec)
    off8 = K.int8pack_offset(q8.spec, f8)
    return {
        "dense_fp32": (torch.float32, lambda x: torch.nn.functional.linear(x, D)),
        "dense_bf16": (torch.bfloat16, lambda x: torch.nn.functional.linear(x, Db)),
        "tiled4_fp32": (torch.float32, lambda x: K.tiled_matmul(x, q4.spec, f4)),
        "tiled4_bf16": (torch.bfloat16, lambda x: K.tiled_matmul(x, q4.spec, f4)),
        "int4pack_fp32_sz_per_call": (torch.float32, lambda x: K.int4pack_linear(
            x, w4, seg, K.int4pack_scales_zeros(q4.spec, f4, seg, torch.float32))),
        "int4pack_fp32_sz_cached": (torch.float32, lambda x: K.int4pack_linear(x, w4, seg, sz32)),
        "int4pack_bf16_sz_per_call": (torch.bfloat16, lambda x: K.int4pack_linear(
            x, w4, seg, K.int4pack_scales_zeros(q4.spec, f4, seg, torch.bfloat16))),
        "sz_forming_only_fp32": (torch.float32, lambda x: K.int4pack_scales_zeros(q4.spec, f4, seg, torch.float32)),
        "tiled8_fp32": (torch.float32, lambda x: K.tiled_matmul(x, q8.spec, f8)),
        "int8pack_fp32": (torch.float32, lambda x: K.int8pack_linear(x, w8, f8["scale"], off8)),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="artifacts/runtime_kernels/kernels.json")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 512])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    ap.add_argument("--shapes", default="all", help="'all' or e.g. 1536x576,4096x11008")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shapes = SHAPES if args.shapes == "all" else [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    rows = []
    with torch.inference_mode():
        for m, n in shapes:
            for name, (dtype, fn) in variants(m, n).items():
                for t in args.tokens:
                    if t > 16 and m * n > 1 << 22 and name in SLOW_PREFILL:
                        continue  # seconds per call (measured on the small shapes); the tiled path runs prefill
                    x = torch.randn(t, n, generator=torch.Generator().manual_seed(1)).to(dtype)
                    reps = args.reps * 4 if t == 1 else args.reps
                    sec = best(lambda fn=fn, x=x: fn(x), reps)
                    rows.append({"shape": [m, n], "tokens": t, "variant": name, "ms": sec * 1e3})
                    print(f"{m:6d}x{n:<6d} t={t:<4d} {name:28s} {sec * 1e3:9.3f} ms", flush=True)
    meta = {"threads": torch.get_num_threads(), "loadavg": os.getloadavg(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(meta)


if __name__ == "__main__":
    main()
