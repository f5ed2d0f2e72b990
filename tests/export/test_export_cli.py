"""`lplr-convert export`: what the command prints, and the output-directory policy (a non-empty directory needs
--overwrite, which replaces only an earlier export and never deletes a file that export did not write)."""

from __future__ import annotations

import pytest
from lplr_testing import run_cli

from lplr_convert import constants as C


def _export(case, out, *extra):
    return run_cli("export", "--in-path", str(case.dst), "--out-path", str(out), *extra)


def _error(res, *needles) -> str:
    assert res.exit_code == 1 and "Traceback" not in res.output
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_prints_which_tensors_went_dense_and_why(exports, tmp_path):
    res = _export(exports["cases"]["mixed"], tmp_path / "ct", "--format", "compressed-tensors")
    assert res.exit_code == 0, res.output
    assert "4 packed, 17 dense (7 copied by the conversion)" in res.stdout
    assert "dense: model.layers.0.self_attn.q_proj.weight (its scheme (8-bit symmetric channel) is not" in res.stdout
    assert "dense: model.layers.0.self_attn.o_proj.weight (method lsvd stores no integer-quantized" in res.stdout
    assert "dense: model.layers.1.mlp.down_proj.weight (group size 64 does not divide its 96" in res.stdout
    assert "dense: model.layers.1.self_attn.v_proj.weight (minmax scheme" in res.stdout
    assert "dense: model.norm.weight" not in res.stdout  # copies are counted, not listed


def test_qlr_exports_say_how_base_and_adapter_fit(exports, tmp_path):
    case = exports["cases"]["qlr_llama"]
    res = _export(case, tmp_path / "ct", "--format", "compressed-tensors")
    assert "14 qlr low-rank corrections are not in this base" in res.stdout
    assert "dequantize=True" in res.stdout  # asymmetric groups: how transformers loads them
    res = _export(case, tmp_path / "peft", "--format", "peft", "--base-model", str(tmp_path / "ct"))
    assert res.exit_code == 0 and "14 LoRA modules, rank 8" in res.stdout


def test_non_empty_directory_needs_overwrite_of_an_earlier_export(exports, tmp_path):
    case, out = exports["cases"]["rtn4_group"], tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    _error(_export(case, out, "--format", "compressed-tensors"), "is not empty", "--overwrite")
    _error(_export(case, out, "--format", "compressed-tensors", "--overwrite"), "holds no earlier export")
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("second", ["compressed-tensors", "peft"])
def test_overwrite_replaces_only_what_the_earlier_export_wrote(exports, tmp_path, second):
    case, out = exports["cases"]["qlr_llama"], tmp_path / "out"
    assert _export(case, out, "--format", "compressed-tensors").exit_code == 0
    assert _export(case, out, "--format", second, "--overwrite").exit_code == 0
    expected = {C.SAFE_SINGLE, C.CONFIG_FILE, "generation_config.json"} if second == "compressed-tensors" else \
        {C.PEFT_CONFIG_FILE, C.PEFT_WEIGHTS_FILE}
    assert {p.name for p in out.iterdir()} == expected | {C.EXPORT_FILE}  # nothing of the first export is left
    (out / "mine.txt").write_text("keep")
    _error(_export(case, out, "--format", "peft", "--overwrite"), "mine.txt", "will not delete")
    assert (out / "mine.txt").read_text() == "keep" and (out / C.EXPORT_FILE).is_file()


def test_base_model_belongs_to_peft(exports, tmp_path):
    res = _export(exports["cases"]["rtn4_group"], tmp_path / "ct", "--format", "compressed-tensors",
                  "--base-model", "x/y")
    _error(res, "--base-model", "peft")


@pytest.mark.parametrize("changed", [C.CONFIG_FILE, "generation_config.json"])
def test_a_file_changed_after_the_conversion_is_refused_before_anything_is_written(exports, tmp_path, changed):
    """decompress and export built their outputs from a config.json edited after the conversion (hidden_act silu ->
    gelu: exit 0, the dense checkpoint carried gelu) although verify and the loaders refuse it; every copied file is
    now checked against the manifest first, and nothing is written."""
    import json
    import shutil

    from lplr_testing import tree_state

    case = exports["cases"]["rtn4_group"]
    src = shutil.copytree(case.dst, tmp_path / "conv")
    doc = json.loads((src / changed).read_text())
    (src / changed).write_text(json.dumps({**doc, "hidden_act": "gelu"}))
    before = tree_state(src)
    for args in (["decompress"], ["export", "--format", "compressed-tensors"], ["export", "--format", "peft"]):
        out = tmp_path / args[-1]
        _error(run_cli(*args, "--in-path", str(src), "--out-path", str(out)), changed,
               "does not match the sha256 in the manifest")
        assert not out.exists() and tree_state(src) == before
