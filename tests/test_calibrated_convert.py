"""`convert --calibration` and `--target-bits-per-param` end to end on the real MiniLM: statistics checked against the
source, output errors recorded and reported, qlr loaded factored (Q x + L (R x)) equal to dense, the global budget
met exactly as promised, and one-line errors for bad statistics and unreachable budgets."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from lplr_testing import run_cli

from lplr_convert import constants as C
from lplr_convert.io.manifest import read_manifest
from lplr_convert.hf.loading import load_model, load_state_dict


def _one_line_error(res, *needles):
    assert res.exit_code != 0 and "Traceback" not in res.output
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def qlr_out(tmp_path_factory, minilm_dir, minilm_stats):
    out = tmp_path_factory.mktemp("qlr") / "out"
    res = run_cli("--in-path", str(minilm_dir), "--out-path", str(out), "--method", "qlr", "--calibration",
                  str(minilm_stats), "--target-bits-per-param", "3.25", "--device", "cpu")
    assert res.exit_code == 0, res.output
    return out


def test_calibrated_qlr_meets_its_budget_and_records_output_errors(qlr_out):
    manifest = read_manifest(qlr_out)
    comp = [r for r in manifest["tensors"] if r["method"] != "copy"]
    params = sum(torch.Size(r["shape"]).numel() for r in comp)
    stored = sum(r["stored_bytes"] for r in comp)
    assert 8 * stored <= 3.25 * params  # the budget, counted from the bytes on disk
    alloc = manifest["options"]["allocation"]
    assert alloc["target_bits_per_param"] == 3.25 and set(alloc["choices"]) == {r["name"] for r in comp}
    assert all(0 <= r["output_rel_error"] < 1 for r in comp)
    assert {r["settings"]["b0"] for r in comp} == {3}  # the documented width rule: widest that fits 3.25
    assert manifest["options"]["calibration"]["samples"] == 48
    md = (qlr_out / C.REPORT_MD).read_text()
    assert "output error" in md and (qlr_out / C.PLOT_OUTPUT_ERROR).is_file()


def test_qlr_factored_model_equals_dense(qlr_out):
    dense = load_model(qlr_out, factored=False)
    factored = load_model(qlr_out, factored=True)
    assert any(getattr(m, "base", None) is not None for m in factored.modules())
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    with torch.no_grad():
        a, b = dense(input_ids=ids).last_hidden_state, factored(input_ids=ids).last_hidden_state
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)  # float32: Q x + L (R x) against (Q + L R) x


def test_statistics_of_another_checkpoint_are_refused(tmp_path, tiny_llama_dir, minilm_stats):
    res = run_cli("--in-path", str(tiny_llama_dir), "--out-path", str(tmp_path / "o"), "--method", "gptq",
                  "--calibration", str(minilm_stats), "--no-report")
    _one_line_error(res, "different checkpoint", "calibrate")
    assert not (tmp_path / "o" / C.MANIFEST_FILE).exists()


def test_statistics_missing_a_tensor_are_refused(tmp_path, minilm_dir, minilm_stats):
    stats = shutil.copytree(minilm_stats, tmp_path / "stats")
    doc = json.loads((stats / C.CALIB_MANIFEST).read_text())
    doc["weights"].pop("encoder.layer.3.output.dense.weight")
    (stats / C.CALIB_MANIFEST).write_text(json.dumps(doc))
    res = run_cli("--in-path", str(minilm_dir), "--out-path", str(tmp_path / "o"), "--method", "gptq",
                  "--calibration", str(stats), "--no-report")
    _one_line_error(res, "encoder.layer.3.output.dense.weight")
    res = run_cli("--in-path", str(minilm_dir), "--out-path", str(tmp_path / "o"), "--method", "gptq",
                  "--calibration", str(tmp_path / "nowhere"), "--no-report")
    _one_line_error(res, "calibrat")


def test_an_unreachable_budget_names_the_smallest_reachable(tmp_path, minilm_dir):
    res = run_cli("--in-path", str(minilm_dir), "--out-path", str(tmp_path / "o"), "--method", "lsvd",
                  "--b1", "8", "--b2", "8", "--target-bits-per-param", "0.01", "--no-report")
    _one_line_error(res, "--target-bits-per-param 0.01 cannot be met", "smallest reachable")
    assert not (tmp_path / "o" / C.MANIFEST_FILE).exists()


def test_uncalibrated_budget_for_factored_methods(tmp_path, minilm_dir):
    out = tmp_path / "o"
    res = run_cli("--in-path", str(minilm_dir), "--out-path", str(out), "--method", "lsvd", "--b1", "4", "--b2", "4",
                  "--target-bits-per-param", "2.5", "--no-report")
    assert res.exit_code == 0, res.output
    comp = [r for r in read_manifest(out)["tensors"] if r["method"] != "copy"]
    assert 8 * sum(r["stored_bytes"] for r in comp) <= 2.5 * sum(torch.Size(r["shape"]).numel() for r in comp)
    assert len({r["rank"] for r in comp}) > 1  # ranks differ by tensor: allocated, not uniform
    assert all(r["output_rel_error"] is None for r in comp)
    assert set(load_state_dict(out)) >= {r["name"] for r in comp}


def test_statistics_of_the_wrong_width_are_refused_before_any_work(tmp_path, minilm_dir, minilm_stats):
    stats = shutil.copytree(minilm_stats, tmp_path / "stats")
    doc = json.loads((stats / C.CALIB_MANIFEST).read_text())
    narrow = doc["weights"]["encoder.layer.3.attention.self.query.weight"]["statistic"]  # 384 wide
    doc["weights"]["encoder.layer.3.output.dense.weight"]["statistic"] = narrow  # its input is 1536 wide
    (stats / C.CALIB_MANIFEST).write_text(json.dumps(doc))
    res = run_cli("--in-path", str(minilm_dir), "--out-path", str(tmp_path / "o"), "--method", "gptq",
                  "--calibration", str(stats), "--no-report")
    _one_line_error(res, "encoder.layer.3.output.dense.weight", "[384, 384]", "1536 wide", "calibrate")
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
