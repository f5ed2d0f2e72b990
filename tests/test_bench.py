"""Smoke test of the benchmark harness: `scripts/bench.py --tiny` runs end to end and emits well-formed records.

Timings are not asserted (targets are benchmarks, not timed tests); what is checked is that every measurement is
there, parses, carries its fields, and that properties which hold at any size do hold: our LPLR with the tensor
quantizer and the reference's sketch gives the reference's error, the flop count follows the stated formula, and
small output shards make more shards than large ones.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "scripts" / "bench.py"

MATRIX_FIELDS = {"impl", "method", "quantizer", "bits", "fraction", "seed", "device", "shape", "rank", "seconds",
                 "rel_error", "peak_bytes", "peak_x_fp32", "mem_method", "status"}


def test_tiny_run_emits_every_measurement(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH), "--tiny", "--write", str(tmp_path)], capture_output=True,
                          text=True, timeout=180, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    records = [json.loads(line) for line in lines]  # every stdout line is one JSON object
    by_kind: dict[str, list[dict]] = {}
    for r in records:
        by_kind.setdefault(r["kind"], []).append(r)
    assert records[0]["kind"] == "env" and records[-1]["kind"] == "env_end"

    (mm,) = by_kind["matmul"]
    assert mm["gflops"] > 0 and len(mm["seconds"]) == mm["reps"]

    matrices = by_kind["matrix"]
    got = sorted((r["impl"], r["method"], r["quantizer"] or "-") for r in matrices)
    assert got == sorted([("ours", "laser", "-"), ("ours", "lplr", "tensor"), ("ours", "lplr", "channel"),
                          ("ours", "lsvd", "tensor"), ("ours", "lsvd", "channel"),
                          ("reference", "lplr", "tensor"), ("reference", "lsvd", "tensor")])
    for r in matrices:
        assert MATRIX_FIELDS <= r.keys(), MATRIX_FIELDS - r.keys()
        assert r["status"] == "ok", r.get("error")
        m, n = r["shape"]
        assert r["rank"] == math.ceil(r["fraction"] * min(m, n))
        assert r["seconds"] > 0 and 0 < r["rel_error"] < 1
        assert r["peak_bytes"] >= 0
        if r["method"] == "lplr":
            r_ = r["rank"]
            assert r["flops"] == 4 * m * n * r_ + m * r_ ** 2 + r_ ** 3 / 3 + 4 * r_ ** 2 * n

    compares = {c["method"]: c for c in by_kind["compare"]}
    assert set(compares) == {"lplr", "lsvd"}
    # Same sketch, same per-tensor min-max quantizer: our LPLR reproduces the published algorithm's error.
    assert abs(compares["lplr"]["error_ratio"] - 1) < 1e-3
    assert abs(compares["lsvd"]["error_ratio"] - 1) < 0.05
    for c in compares.values():
        assert math.isclose(c["speedup"] * c["time_ratio_ours_over_reference"], 1.0)

    targets = by_kind["target"]
    assert targets and all(t["pass"] in (True, False, None) for t in targets)
    assert any("error within 1%" in t["target"] for t in targets)

    conversions = {c["shards"]: c for c in by_kind["convert"]}
    assert set(conversions) == {"small", "large"}
    for c in conversions.values():
        assert c["baseline_rss_bytes"] > 0 and c["largest_fp32_bytes"] > 0
        assert c["status"] in ("ok", "pending")
    if all(c["status"] == "ok" for c in conversions.values()):
        assert conversions["small"]["output_shards"] > conversions["large"]["output_shards"] == 1
        assert all(c["manifest_complete"] for c in conversions.values())
        assert all(c["peak_rss_bytes"] > 0.9 * c["baseline_rss_bytes"] for c in conversions.values())

    # End to end: every whole-process command ran, the derived ratios follow from the times, targets were judged.
    (e2e,) = by_kind["e2e"]
    assert e2e["status"] == "ok", e2e["runs"]
    runs = e2e["runs"]
    assert set(runs) == {"cli_report", "cli_no_report", "reference"} and all(r["rc"] == 0 for r in runs.values())
    assert math.isclose(e2e["speedup_with_report"], runs["reference"]["seconds"] / runs["cli_report"]["seconds"])
    assert math.isclose(e2e["report_overhead"],
                        runs["cli_report"]["seconds"] / runs["cli_no_report"]["seconds"] - 1)
    assert runs["cli_report"]["report_seconds"] > 0 and runs["cli_no_report"]["report_seconds"] is None
    assert any("faster than the reference process" in t["target"] for t in targets)
    assert any("report adds <= 10 %" in t["target"] for t in targets)
    (workers,) = by_kind["e2e_workers"]
    assert workers["status"] == "ok" and set(workers["runs"]) == {"workers_1", "workers_2"}

    # The written files hold the same records and a table with a verdict per target.
    assert (tmp_path / "results.jsonl").read_text().strip().splitlines() == lines
    md = (tmp_path / "results.md").read_text()
    assert "## Targets" in md and md.count("| **") >= len(targets) and "## End to end" in md
