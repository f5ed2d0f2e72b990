"""Smoke test of the runtime benchmark: `scripts/bench_runtime.py --tiny` converts a tiny random Llama with the real
CLI (calibrated qlr and its backbone alone through a recipe, rtn), measures every configuration in a fresh process
and writes results.json, results.md and NOTES.md.

Timings are not asserted (targets are benchmarks, not timed tests); what is checked is that every measurement is
there and the properties that hold at any size: the originals hold exactly params x dtype bytes, the stored bytes
are the shards' tensor data, the ratios follow from the numbers they divide, the backbone alone stores no more than
qlr, and the float32 original's greedy tokens agree with themselves.
"""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "scripts" / "bench_runtime.py"
CONFIGS = ("float32", "bfloat16", "rtn-4", "qlr-4.25", "qlr-4.25-backbone")
RUN_FIELDS = {"params_buffers_bytes", "held_bytes", "rss_base_bytes", "rss_after_load_bytes", "peak_rss_load_bytes",
              "peak_rss_bytes", "load_seconds", "prefill_seconds", "decode_seconds", "prefill_tok_s", "decode_tok_s",
              "tokens", "module_types", "params", "stored_bytes", "linear_bits"}


def _tensor_bytes(root: Path) -> int:
    total = 0
    for f in root.glob("*.safetensors"):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        total += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")
    return total


def test_tiny_run_emits_every_measurement(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH), "--tiny", "--write", str(tmp_path), "--configs",
                           ",".join(CONFIGS)], capture_output=True, text=True, timeout=600, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(ln) for ln in proc.stdout.strip().splitlines()]  # every stdout line is one JSON object
    assert lines[0]["kind"] == "env" and lines[0]["mode"] == "tiny"

    doc = json.loads((tmp_path / "results.json").read_text())
    runs = {r["config"]: r for r in doc["runs"]}
    assert tuple(runs) == CONFIGS
    params = doc["models"][0]["params"]
    for name, r in runs.items():
        assert r["status"] == "ok", (name, r.get("error"))
        assert RUN_FIELDS <= r.keys(), (name, RUN_FIELDS - r.keys())
        assert r["params"] == params
        assert 0 < r["params_buffers_bytes"] <= r["held_bytes"]
        assert 0 < r["rss_base_bytes"] and r["rss_after_load_bytes"] <= r["peak_rss_load_bytes"] <= r["peak_rss_bytes"]
        assert r["prefill_tokens"] == 16 and r["decode_tokens"] == 4 and len(r["tokens"]) == 4
        assert r["prefill_tok_s"] == r["prefill_tokens"] / min(r["prefill_seconds"]) > 0
        assert r["decode_tok_s"] == r["decode_tokens"] / min(r["decode_seconds"]) > 0
        assert math.isclose(r["ratio_to_stored"], r["held_bytes"] / r["stored_bytes"])
        assert math.isclose(r["bits_per_param_stored"] * params, r["stored_bytes"] * 8)
        assert math.isclose(r["decode_vs_bf16"], r["decode_tok_s"] / runs["bfloat16"]["decode_tok_s"])

    # The originals hold what their dtype stores (tied embedding and head counted once), plus the rotary embedding's
    # inverse frequencies (buffers no checkpoint stores: a few dozen bytes here).
    src = Path(doc["models"][0]["src"])
    assert runs["float32"]["stored_bytes"] == _tensor_bytes(src) == 4 * params
    assert runs["bfloat16"]["stored_bytes"] == 2 * params
    for name, size in (("float32", 4), ("bfloat16", 2)):
        assert runs[name]["params_buffers_bytes"] == runs[name]["held_bytes"]
        assert 0 <= runs[name]["held_bytes"] - size * params < 1024
    assert runs["float32"]["tokens_agree_with_float32"] == 4

    # Ours: stored = the shards' tensor data; bits of the compressed linears within the budget; the backbone alone
    # (qlr at rank 0 at the widths qlr-4.25 chose) stores no more than qlr with its correction.
    for name in ("rtn-4", "qlr-4.25", "qlr-4.25-backbone"):
        assert runs[name]["stored_bytes"] == _tensor_bytes(Path(runs[name]["path"]))
    assert runs["qlr-4.25"]["calibrated"] and not runs["qlr-4.25-backbone"]["calibrated"]
    assert runs["qlr-4.25"]["linear_bits"] <= 4.25 + 1e-9
    assert runs["qlr-4.25-backbone"]["linear_bits"] <= runs["qlr-4.25"]["linear_bits"]
    assert 4 < runs["rtn-4"]["linear_bits"] < 4.5  # 4-bit codes plus a scale and zero point per 128

    targets = {(t["config"], t["target"]): t for t in doc["targets"]}
    for name in ("rtn-4", "qlr-4.25", "qlr-4.25-backbone"):
        t = targets[(name, "memory <= 1.05 x stored")]
        assert t["pass"] is (t["value"] <= 1.05) and math.isclose(t["value"], runs[name]["ratio_to_stored"])
    for name in ("rtn-4", "qlr-4.25"):
        assert targets[(name, "4-bit decode tok/s >= bfloat16 original's")]["pass"] in (True, False)
        assert targets[(name, "4-bit decode tok/s >= fastest peer at equal or more bits")]["pass"] is None  # no peers
    t = targets[("qlr-4.25", "qlr decode time <= 1.3 x its backbone alone")]
    assert math.isclose(t["value"], runs["qlr-4.25-backbone"]["decode_tok_s"] / runs["qlr-4.25"]["decode_tok_s"])

    md = (tmp_path / "results.md").read_text()
    assert all(f"| {name} |" in md for name in CONFIGS)
    notes = (tmp_path / "NOTES.md").read_text()
    assert doc["env"]["cpu"] in notes and doc["env"]["date"][:10] in notes
