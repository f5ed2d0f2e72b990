"""Rank-deficient calibration is told (issue 24): statistics averaged over fewer tokens than their input width are a
named warning at calibrate and at convert --calibration, and a calibrated result further from its weight than the
zero matrix (hence than the uncalibrated truncated SVD of any rank) is named."""

from __future__ import annotations

import pytest
from loguru import logger
from lplr_testing import run_cli

from lplr_convert.calibration import calibrate
from lplr_convert.calibration.coverage import thin_statistics, warn_thin_statistics, worse_than_uncalibrated


@pytest.fixture
def warnings():
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="WARNING")
    yield lines
    try:
        logger.remove(sink)
    except ValueError:  # the CLI replaced every handler
        pass


def test_thin_statistics_are_those_with_fewer_tokens_than_inputs(warnings):
    stats = {"a": {"shape": [64, 64], "tokens": 40}, "b": {"shape": [160, 160], "tokens": 40},
             "c": {"shape": [64, 64], "tokens": 64}}
    assert thin_statistics(stats) == [("b", 40, 160), ("a", 40, 64)]  # the widest shortfall first
    assert not warn_thin_statistics(stats, "S", keys=["c"]) and not warnings
    assert warn_thin_statistics(stats, "S")
    assert len(warnings) == 1 and "rank-deficient calibration: 2 of 3 statistics in S" in warnings[0]
    assert "b (40 tokens for 160 inputs)" in warnings[0] and "at least 160 tokens" in warnings[0]


def test_a_result_further_than_zero_is_named(warnings):
    assert not worse_than_uncalibrated("w", "lplr", 0.99) and not worse_than_uncalibrated("w", "lplr", float("nan"))
    assert worse_than_uncalibrated("model.layers.0.mlp.up_proj.weight", "lplr", 6.9, tokens=83, width=384)
    assert len(warnings) == 1
    assert "model.layers.0.mlp.up_proj.weight: calibrated lplr" in warnings[0] and "6.9" in warnings[0]
    assert "83 tokens for 384 inputs" in warnings[0]


def test_too_few_tokens_warn_at_calibrate_and_at_convert(tiny_dir, text_file, tmp_path, warnings):
    path = tiny_dir("llama")  # hidden 64, intermediate 160
    thin, full = tmp_path / "thin", tmp_path / "full"
    calibrate(path, thin, text=text_file, samples=1, seq_len=40, batch_size=1)
    assert [w for w in warnings if "rank-deficient calibration" in w and str(thin) in w]
    warnings.clear()
    manifest = calibrate(path, full, text=text_file, samples=12, seq_len=40, batch_size=4)
    assert manifest["tokens"] >= 160 and not [w for w in warnings if "rank-deficient" in w]
    res = run_cli("--in-path", str(path), "--out-path", str(tmp_path / "o_thin"), "--calibration", str(thin),
                  "--no-report")
    assert res.exit_code == 0, res.output
    assert "rank-deficient calibration" in res.stderr and str(thin) in res.stderr
    res = run_cli("--in-path", str(path), "--out-path", str(tmp_path / "o_full"), "--calibration", str(full),
                  "--no-report")
    assert res.exit_code == 0 and "rank-deficient" not in res.stderr, res.output


def test_convert_names_a_calibrated_tensor_worse_than_zero(tiny_dir, text_file, tmp_path, monkeypatch):
    """A calibrated result whose weight error exceeds 1 is named by convert (the error is forced here: which real
    statistics give one depends on the model)."""
    from lplr_convert.pipeline import task

    path, stats = tiny_dir("llama"), tmp_path / "stats"
    calibrate(path, stats, text=text_file, samples=12, seq_len=40, batch_size=4)
    orig = task._compress_checked

    def worse(plan, W, seed, st):
        result, why = orig(plan, W, seed, st)
        if result is not None and plan.name.endswith("layers.1.mlp.up_proj.weight"):
            result.rel_error = 3.5
        return result, why

    monkeypatch.setattr(task, "_compress_checked", worse)
    res = run_cli("--in-path", str(path), "--out-path", str(tmp_path / "o"), "--calibration", str(stats),
                  "--no-report")
    assert res.exit_code == 0, res.output
    named = [ln for ln in res.stderr.split("WARNING") if "layers.1.mlp.up_proj.weight: calibrated lplr" in ln]
    assert len(named) == 1 and "3.5 x the weight's norm" in named[0] and "further than the zero matrix" in named[0]
