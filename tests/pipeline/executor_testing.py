"""Helpers of the executor tests (a uniquely named module, so it never collides with a conftest): the recipe of the
reference run and what two runs are compared by."""

from __future__ import annotations

import hashlib
from pathlib import Path

from lplr_testing import run_cli

from lplr_convert import constants as C
from lplr_convert.io.manifest import read_manifest

RECIPE = """\
rules:
  - {types: [q_proj, k_proj], method: lsvd, rank_fraction: 0.5}
  - {types: [fc_out], method: rtn, b0: 4}
  - {layers: [1], types: [v_proj], method: laser, rho: 0.5}
  - {types: [fc_in], method: dsvd, rank_fraction: 0.3}
"""


def snapshot(out: Path) -> tuple[dict, list, dict, str]:
    """Everything a run's output is judged by: shard and index bytes, records without `seconds`, shard hashes."""
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())
             if p.name.startswith("model")}
    m = read_manifest(out)
    return files, [{k: v for k, v in r.items() if k != "seconds"} for r in m["tensors"]], m["shards"], \
        (out / C.SAFE_INDEX).read_text()


def convert_args(src: Path, out: Path, recipe: Path, *extra: str) -> list[str]:
    return ["--in-path", str(src), "--out-path", str(out), "--recipe", str(recipe), "--max-shard-size", "30KB",
            "--seed", "3", "--no-report", *extra]


def run_like_reference(reference: tuple, src: Path, out: Path, *extra: str) -> dict:
    """Run the reference's conversion with `extra` options into `out`, check that it wrote exactly the reference's
    output, and return the run's recorded options."""
    recipe, ref = reference
    res = run_cli(*convert_args(src, out, recipe, *extra))
    assert res.exit_code == 0, res.output
    assert snapshot(out) == ref
    return read_manifest(out)["options"]
