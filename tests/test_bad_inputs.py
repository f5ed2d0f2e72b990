"""Every bad input is one `error:` line naming the file, the field and the fix (never "unexpected <Exception>"), for
`convert` and `inspect` alike, and nothing outside the output directory changes."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from lplr_testing import error_line, run_cli, tiny_checkpoint, tree_state

from lplr_convert import constants as C
from lplr_convert import load_state_dict
from lplr_convert.io.manifest import read_manifest

NAME = "model.layers.0.mlp.up_proj.weight"


def _base(src: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    return tiny_checkpoint(src, {NAME: torch.randn(16, 8, generator=g), "model.norm.weight": torch.ones(8)})


def _index(text: bytes) -> Callable[[Path], list[str]]:
    def make(src: Path) -> list[str]:
        (src / C.SAFE_INDEX).write_bytes(text)
        return [str(src)]
    return make


def _config(text: bytes) -> Callable[[Path], list[str]]:
    def make(src: Path) -> list[str]:
        (src / C.CONFIG_FILE).write_bytes(text)
        return [str(src)]
    return make


def _header(header: str, data: bytes = b"\0" * 16) -> Callable[[Path], list[str]]:
    def make(src: Path) -> list[str]:
        raw = header.encode()
        (src / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data)
        return [str(src)]
    return make


def _bin(payload) -> Callable[[Path], list[str]]:
    def make(src: Path) -> list[str]:
        (src / "model.safetensors").unlink()
        if isinstance(payload, bytes):
            (src / "pytorch_model.bin").write_bytes(payload)
        else:
            torch.save(payload, src / "pytorch_model.bin")
        return [str(src)]
    return make


def _renamed(suffix: str) -> Callable[[Path], list[str]]:
    def make(src: Path) -> list[str]:
        target = src / f"model{suffix}"
        (src / "model.safetensors").rename(target)
        return [str(target)]
    return make


def _given(path: str) -> Callable[[Path], list[str]]:
    return lambda src: [str(src / path) if not path.startswith("/") else path]


def _weight_map(value) -> bytes:
    return json.dumps({"metadata": {}, "weight_map": value}).encode()


# id -> (make the source, return --in-path; what the error line names; what it must not say)
SOURCES = {
    "index_weight_map_list": (_index(_weight_map(["model.safetensors"])), [C.SAFE_INDEX, "weight_map"], None),
    "index_weight_map_int": (_index(_weight_map({NAME: 5})), [C.SAFE_INDEX, NAME, "not a shard file name"], None),
    "index_not_utf8": (_index(b'{"weight_map": {"\xff": "model.safetensors"}}'), [C.SAFE_INDEX, "not UTF-8"], None),
    "index_not_json": (_index(b"{weight_map"), [C.SAFE_INDEX, "not valid JSON"], None),
    "index_a_list": (_index(b"[1, 2]"), [C.SAFE_INDEX, "weight_map"], None),
    "config_a_list": (_config(b"[1, 2]"), [C.CONFIG_FILE, "JSON list"], None),
    "config_not_utf8": (_config(b'{"model_type": "\xff"}'), [C.CONFIG_FILE, "not UTF-8"], None),
    "config_model_type_int": (_config(b'{"model_type": 5}'), [C.CONFIG_FILE, "model_type", "string"], None),
    "config_model_type_list": (_config(b'{"model_type": ["gpt2"]}'), [C.CONFIG_FILE, "model_type"], None),
    "config_architectures": (_config(b'{"architectures": "LlamaForCausalLM"}'), [C.CONFIG_FILE, "architectures"],
                             None),
    "header_negative_dims": (_header(json.dumps({NAME: {"dtype": "F32", "shape": [-2, -2],
                                                        "data_offsets": [0, 16]}})),
                             ["model.safetensors", NAME, "non-negative"], None),
    "header_float_dims": (_header(json.dumps({NAME: {"dtype": "F32", "shape": [2.5, 2], "data_offsets": [0, 16]}})),
                          ["model.safetensors", "non-negative integers"], None),
    "header_nested_deeply": (_header('{"a":' + "[" * 100_000 + "]" * 100_000 + "}", b""),
                             ["model.safetensors", "nested too deeply"], None),
    "bin_integer_keys": (_bin({1: torch.zeros(4, 4)}), ["pytorch_model.bin", "int key 1", "string"], None),
    "bin_garbage": (_bin(bytes(range(256)) * 4), ["pytorch_model.bin", "not a PyTorch checkpoint"], "safe loader"),
    "bin_damaged_pickle": (_bin(b"\x80\x02garbage"), ["pytorch_model.bin", "damaged"], "safe loader"),
    "safetensors_named_pt": (_renamed(".pt"), ["model.pt", "safetensors file", "rename it"], "safe loader"),
    "safetensors_named_bin": (_renamed(".bin"), ["model.bin", "rename it"], "safe loader"),
    "config_given_as_input": (_given(C.CONFIG_FILE), ["config.json", "not a weight file", "directory"], "safe loader"),
    "dev_null": (_given("/dev/null"), ["/dev/null", "neither a directory nor a regular file"], "permission"),
}


@pytest.mark.parametrize("case", list(SOURCES))
def test_bad_sources_are_named_by_convert_and_inspect(tmp_path, case):
    make, needles, never = SOURCES[case]
    src = _base(tmp_path / "src")
    sibling = _base(tmp_path / "sibling")
    in_path = make(src)[0]
    before = tree_state(src, sibling)
    out = tmp_path / "out"
    for args in (["--in-path", in_path, "--out-path", str(out), "--no-report"], ["inspect", "--in-path", in_path]):
        line = error_line(run_cli(*args), *needles)
        assert "unexpected" not in line
        assert never is None or never not in line.lower(), line
    assert tree_state(src, sibling) == before
    assert not out.exists()


RECIPES = {
    "binary": (bytes(range(256)), ["recipe.yaml", "not UTF-8"]),
    "defaults_5": (b"defaults: 5\n", ["recipe.yaml", "defaults must be a mapping", "5"]),
    "defaults_list": (b"defaults: [1, 2]\n", ["recipe.yaml", "defaults must be a mapping", "[1, 2]"]),
    "pattern_123": (b"rules:\n  - pattern: 123\n    method: rtn\n", ["recipe.yaml", "rule 1", "pattern", "123"]),
    "rules_5": (b"rules: 5\n", ["recipe.yaml", "rules"]),
    "method_5": (b"rules:\n  - pattern: x\n    method: 5\n", ["recipe.yaml", "rule 1", "method 5"]),
    "types_nested": (b"rules:\n  - types: [[1]]\n", ["recipe.yaml", "rule 1", "--types"]),
    "layers_word": (b"rules:\n  - layers: x\n", ["recipe.yaml", "rule 1", "--layers"]),
    "not_yaml": (b"rules: [\n", ["recipe.yaml", "not valid YAML"]),
}


@pytest.mark.parametrize("case", list(RECIPES))
def test_bad_recipes_are_named(tmp_path, case):
    text, needles = RECIPES[case]
    src = _base(tmp_path / "src")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(text)
    before = tree_state(src, recipe)
    for cmd in (["--out-path", str(tmp_path / "out"), "--no-report"], ["inspect"]):
        args = [*cmd, "--in-path", str(src), "--recipe", str(recipe)]
        line = error_line(run_cli(*args), *needles)
        assert "unexpected" not in line
    assert tree_state(src, recipe) == before
    assert not (tmp_path / "out").exists()


def test_bad_option_values_are_one_line_usage_errors(tmp_path):
    src = _base(tmp_path / "src")
    error_line(run_cli("--in-path", str(src), "--out-path", str(tmp_path / "o"), "--max-shard-size", "inf"),
               "--max-shard-size", "inf", "5GB")
    error_line(run_cli("--in-path", str(src), "--out-path", str(tmp_path / "o"), "--max-shard-size", "-1MB"),
               "--max-shard-size")
    out = tmp_path / "conv"
    assert run_cli("--in-path", str(src), "--out-path", str(out), "--no-report").exit_code == 0
    error_line(run_cli("verify", "--in-path", str(out), "--sample", "0"), "--sample", "0")


def test_verify_source_of_other_shapes_is_named(tmp_path):
    src = _base(tmp_path / "src")
    out = tmp_path / "conv"
    assert run_cli("--in-path", str(src), "--out-path", str(out), "--no-report").exit_code == 0
    other = tiny_checkpoint(tmp_path / "other", {NAME: torch.randn(8, 16)})
    line = error_line(run_cli("verify", "--in-path", str(out), "--source", str(other)), NAME, "[8, 16]",
                      "[16, 8]", "--source", "not the checkpoint this was converted from")
    assert "re-download" not in line  # the output is fine; the source is the wrong one


def test_a_2d_float8_weight_is_copied_and_says_why(tmp_path):
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("this torch has no float8")
    w = torch.randn(16, 8).to(torch.float8_e4m3fn)
    src = tiny_checkpoint(tmp_path / "src", {NAME: w})
    res = run_cli("inspect", "--in-path", str(src), "--include", "up_proj")
    assert res.exit_code == 0 and "copy" in res.output
    out = tmp_path / "out"
    res = run_cli("--in-path", str(src), "--out-path", str(out), "--no-report", "--include", "up_proj")
    assert res.exit_code == 0, res.output
    rec = read_manifest(out)["tensors"][0]
    assert rec["method"] == "copy" and "float8" in rec["reason"]
    got = load_state_dict(out)[NAME]
    assert got.dtype == w.dtype and torch.equal(got.view(torch.uint8), w.view(torch.uint8))
