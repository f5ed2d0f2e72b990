"""`inspect` is the run's plan: the same plan and allocation code as `convert`, so it predicts exactly the bytes a
conversion writes, for every method with and without a global budget; an option a method ignores is named."""

from __future__ import annotations

import json

import pytest
import torch
from lplr_testing import run_cli, tiny_checkpoint

from lplr_convert import constants as C
from lplr_convert.methods import available_methods

METHODS = [m for m in available_methods() if m != "copy"]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    tensors = {f"model.layers.{i}.{name}.weight": torch.randn(shape, generator=g)
               for i in range(2) for name, shape in (("self_attn.q_proj", (48, 48)), ("mlp.up_proj", (96, 48)),
                                                     ("mlp.down_proj", (48, 96)))}
    tensors["model.norm.weight"] = torch.ones(48)
    return tiny_checkpoint(tmp_path_factory.mktemp("plan") / "src", tensors)


def _inspect(src, *extra):
    res = run_cli("inspect", "--in-path", str(src), "--json", *extra)
    return res, json.loads(res.stdout) if res.exit_code == 0 else None


@pytest.mark.parametrize("target", [None, "3.5"])
@pytest.mark.parametrize("method", METHODS)
def test_inspect_predicts_the_bytes_convert_writes(src, tmp_path, method, target):
    extra = ["--method", method, *(["--target-bits-per-param", target] if target else [])]
    res, info = _inspect(src, *extra)
    conv = run_cli("--in-path", str(src), "--out-path", str(tmp_path / "out"), "--no-report", *extra)
    assert res.exit_code == conv.exit_code, (res.output, conv.output)
    if conv.exit_code:  # refused: the same one-line error from both
        assert [ln for ln in res.stderr.splitlines() if ln.startswith("error:")] == \
            [ln for ln in conv.stderr.splitlines() if ln.startswith("error:")]
        return
    records = json.loads((tmp_path / "out" / C.MANIFEST_FILE).read_text())["tensors"]
    written = {r["name"]: (r["stored_bytes"], r["settings"]) for r in records if r["method"] != "copy"}
    predicted = {r["name"]: (r["predicted_bytes"], r["settings"]) for r in info["tensors"] if r["method"] != "copy"}
    assert len(written) == 6 and predicted == written


def test_a_budget_changes_the_prediction(src):
    sizes = [_inspect(src, "--method", "qlr", *extra)[1]["predicted_tensor_bytes"]
             for extra in ([], ["--target-bits-per-param", "2"])]
    assert sizes[1] < sizes[0]


@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_an_option_the_method_ignores_is_named(src, tmp_path, command):
    out = [] if command == "inspect" else ["--out-path", str(tmp_path / "out"), "--no-report"]
    res = run_cli(command, "--in-path", str(src), *out, "--method", "rtn", "--rank", "4", "--b1", "3")
    assert res.exit_code == 0, res.output
    warning = [ln for ln in res.stderr.splitlines() if "do(es) not apply to --method rtn" in ln]
    assert len(warning) == 1 and "--rank" in warning[0] and "--b1" in warning[0]
