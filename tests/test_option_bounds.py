"""Small options, bounded work (issue 24): --layers is a set of ranges bounded by the checkpoint's blocks (a range
beyond the model, a reversed range or a negative index is a one-line error naming the valid range, not a silent
run that compresses nothing); a group size above a matrix's width is one group per row (no padded copy of 1e8
columns); iteration counts are bounded."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tracemalloc

import pytest
import torch
from lplr_testing import error_line, run_cli, tiny_checkpoint

from lplr_convert import LplrError, load_state_dict
from lplr_convert.methods import make_settings
from lplr_convert.methods.settings import MAX_ITERATIONS
from lplr_convert.pipeline.plan import load_recipe, parse_layers


def test_a_huge_layer_range_is_two_integers():
    tracemalloc.start()
    try:
        layers = parse_layers("0-100000000,5,7-9")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # a set of 1e8 ints would take gigabytes
    assert layers.ranges == ((0, 100000000),)
    assert 0 in layers and 100000000 in layers and 100000001 not in layers and None not in layers
    assert parse_layers("3,1-2,9").ranges == ((1, 3), (9, 9)) and 5 not in parse_layers("3,1-2,9")
    assert parse_layers("-1") is None and parse_layers("all") is None and parse_layers([0, 2]).ranges == ((0, 0), (2, 2))


def test_a_huge_layer_range_in_a_recipe_is_two_integers(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("rules:\n  - {layers: '0-100000000', method: rtn}\n")
    tracemalloc.start()
    try:
        _, rules = load_recipe(recipe, {"method": "lplr"})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20 and rules[0].layers.ranges == ((0, 100000000),)


@pytest.mark.parametrize(("spec", "needles"), [
    ("100", ["--layers 100", "blocks are 0-1"]),
    ("0-100000000", ["--layers 0-100000000", "blocks are 0-1"]),
    ("1,2", ["blocks are 0-1"]),
    ("5-3", ["5-3", "empty", "3-5"]),
    ("-5", ["block -5 does not exist", "-1 for all"]),
    ("x", ["not a list of block indices"]),
    ("9" * 5000, ["not a list of block indices"]),  # int() of 5000 digits would raise ValueError
])
def test_layers_outside_the_model_are_a_one_line_error(tiny_llama_dir, tmp_path, spec, needles):
    out = tmp_path / "out"
    error_line(run_cli("--in-path", str(tiny_llama_dir), "--out-path", str(out), f"--layers={spec}"), *needles)
    assert not out.exists()


def test_recipe_layers_must_select_a_block(tiny_llama_dir, tmp_path):
    recipe, out = tmp_path / "r.yaml", tmp_path / "out"
    recipe.write_text("rules:\n  - {layers: '50-60', method: rtn}\n")
    error_line(run_cli("--in-path", str(tiny_llama_dir), "--out-path", str(out), "--recipe", str(recipe)),
               "rule 1", "select no block", "blocks are 0-1")
    assert not out.exists()
    recipe.write_text("rules:\n  - {layers: '1-100000000', method: rtn}\n")  # shared recipes may reach beyond
    assert run_cli("--in-path", str(tiny_llama_dir), "--out-path", str(out), "--recipe", str(recipe),
                   "--no-report").exit_code == 0
    methods = {r["name"]: r["method"] for r in json.loads((out / "lplr_manifest.json").read_text())["tensors"]}
    assert methods["model.layers.1.mlp.up_proj.weight"] == "rtn" and methods["model.layers.0.mlp.up_proj.weight"] \
        == "lplr"


def _limited(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return apply


def test_group_size_above_the_width_is_one_group_per_row(tmp_path):
    """--group-size 1e8 on a 64x128 matrix asked for 25.6 GB (the padded group view); under a 6 GB address-space limit
    it now converts, and decodes exactly like per-row (channel) scales."""
    torch.manual_seed(0)
    src = tiny_checkpoint(tmp_path / "src", {"model.layers.0.mlp.up_proj.weight": torch.randn(64, 128)})
    common = [sys.executable, "-m", "lplr_convert.cli", "--in-path", str(src), "--method", "rtn", "--b0", "4",
              "--no-report", "--device", "cpu"]
    env = dict(os.environ, LOGURU_LEVEL="WARNING")
    group = subprocess.run([*common, "--out-path", str(tmp_path / "group"), "--quantizer", "group",
                            "--group-size", "100000000"], env=env, capture_output=True, text=True, timeout=300,
                           preexec_fn=_limited(6 << 30), check=False)
    assert group.returncode == 0, group.stderr
    chan = subprocess.run([*common, "--out-path", str(tmp_path / "chan")], env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert chan.returncode == 0, chan.stderr
    a, b = load_state_dict(tmp_path / "group"), load_state_dict(tmp_path / "chan")
    assert torch.equal(a["model.layers.0.mlp.up_proj.weight"], b["model.layers.0.mlp.up_proj.weight"])


@pytest.mark.parametrize(("method", "knob", "low"), [("lplr", "power_iters", 0), ("qlr", "iters", 1)])
def test_iteration_counts_are_bounded(method, knob, low, tmp_path):
    assert getattr(make_settings(method, **{knob: MAX_ITERATIONS}), knob) == MAX_ITERATIONS
    for bad in (10**9, MAX_ITERATIONS + 1, low - 1):
        with pytest.raises(LplrError, match=f"{knob} {bad} must be an integer from {low} to {MAX_ITERATIONS}"):
            make_settings(method, **{knob: bad})
    flag = "--" + knob.replace("_", "-")
    error_line(run_cli("--in-path", "bundled:all-MiniLM-L6-v2", "--out-path", str(tmp_path / "o"), "--method",
                       method, flag, "1000000000"), f"{flag} 1000000000", f"from {low} to {MAX_ITERATIONS}")
    assert not (tmp_path / "o").exists()


