"""Fixtures of the executor tests: a single-process reference run to compare every executor with."""

from __future__ import annotations

import pytest
from executor_testing import RECIPE, convert_args, snapshot
from lplr_testing import run_cli


@pytest.fixture(scope="module")
def reference(tiny_llama_dir, tmp_path_factory):
    """A single-process run (in this process) of the tiny sharded Llama with five methods mixed by a recipe."""
    tmp = tmp_path_factory.mktemp("pool_ref")
    recipe = tmp / "recipe.yaml"
    recipe.write_text(RECIPE)
    out = tmp / "out"
    res = run_cli(*convert_args(tiny_llama_dir, out, recipe))
    assert res.exit_code == 0, res.output
    snap = snapshot(out)
    assert len(snap[2]) >= 4 and {r["method"] for r in snap[1]} == {"copy", "lplr", "lsvd", "rtn", "laser", "dsvd"}
    return recipe, snap


