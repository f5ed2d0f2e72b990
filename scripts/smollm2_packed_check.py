"""One-off check on the real SmolLM2-135M-Instruct (its publisher quantized it to 4 bits in blocks of 32, GGUF Q4_1):
a conversion loaded packed and unpacked: greedy tokens, parameter+buffer bytes against the stored bytes, peak RSS of
loading, decode time. Each load in a fresh process (RSS).

    PYTHONPATH=. python scripts/smollm2_packed_check.py DST [--tokens 20]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def child(dst: str, mode: str, tokens: int) -> dict:
    import torch
    from transformers import AutoTokenizer

    import lplr_convert
    from lplr_convert.runtime.modules import PackedLinear, kernel_counts

    torch.set_num_threads(1)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    dtype = torch.bfloat16 if mode.endswith("bf16") else None
    model = lplr_convert.load_model(dst, packed=mode.startswith("packed"), dtype=dtype)
    load_s = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tok = AutoTokenizer.from_pretrained("/work/cache/smollm2-135m")
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    with torch.no_grad():
        t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False, min_new_tokens=tokens)
        gen_s = time.perf_counter() - t
    seen = {}
    held = sum(t.numel() * t.element_size() for t in {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
               if seen.setdefault(id(t), True))
    packed = sum(b.numel() * b.element_size() for m in model.modules() if isinstance(m, PackedLinear)
                 for b in m.buffers())
    return {"mode": mode, "tokens": out[0, ids.shape[1]:].tolist(), "text": tok.decode(out[0, ids.shape[1]:]),
            "params_buffers_bytes": held, "packed_bytes": packed, "kernels": dict(kernel_counts(model.modules())),
            "load_s": load_s, "generate_s": gen_s, "new_tokens": int(out.shape[1] - ids.shape[1]),
            "peak_rss_after_import_kib": rss0, "peak_rss_after_load_kib": rss}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dst")
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--child", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.dst, args.child, args.tokens)))
        return
    from lplr_convert.io.manifest import Manifest, read_manifest

    records = Manifest.from_json(read_manifest(args.dst)).tensors
    stored = sum(m["bytes"] for r in records if r.method != "copy" for m in r.stored.values())
    copied = sum(m["bytes"] for r in records if r.method == "copy" for m in r.stored.values())
    rows = []
    for mode in ("packed", "float", "packed-bf16", "float-bf16"):
        res = subprocess.run([sys.executable, __file__, args.dst, "--tokens", str(args.tokens), "--child", mode],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "tokens"}), flush=True)
    same = {f"{a}=={b}": rows[i]["tokens"] == rows[j]["tokens"] for i, a, j, b in
            ((0, "packed", 1, "float"), (2, "packed-bf16", 3, "float-bf16"))}
    summary = {"stored_compressed_bytes": stored, "copied_bytes": copied, "same_tokens": same, "rows": rows,
               "date": time.strftime("%Y-%m-%d %H:%M:%S"), "loadavg": __import__("os").getloadavg()}
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
