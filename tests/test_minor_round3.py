"""Issue 24's minor list: each a named one-line error or a correct result."""

from __future__ import annotations

import os

import pytest
import torch
from lplr_testing import error_line, run_cli, tiny_checkpoint

NAME = "model.layers.0.mlp.up_proj.weight"


@pytest.fixture
def src(tmp_path):
    return tiny_checkpoint(tmp_path / "src", {NAME: torch.randn(32, 16)})


@pytest.mark.parametrize("args,needles", [
    (["--method", "laser", "--rho", "0.5", "--target-bits-per-param", "4"], ["laser", "nothing to allocate"]),
    (["--method", "lplr", "--rank", "4", "--target-bits-per-param", "4"], ["--rank", "nothing to allocate"]),
])
def test_a_budget_with_nothing_to_size_is_named(tmp_path, src, args, needles):
    out = tmp_path / "out"
    error_line(run_cli("--in-path", str(src), "--out-path", str(out), "--no-report", *args),
               "--target-bits-per-param", *needles)
    assert not out.exists() or not any(out.iterdir())


def test_a_rank_given_beside_a_budget_is_kept_where_other_tensors_can_be_sized(tmp_path):
    import json

    src = tiny_checkpoint(tmp_path / "src", {NAME: torch.randn(32, 16), "model.layers.0.mlp.down_proj.weight":
                                             torch.randn(16, 32)})
    out = tmp_path / "out"
    res = run_cli("--in-path", str(src), "--out-path", str(out), "--no-report", "--method", "qlr", "--rank", "3",
                  "--target-bits-per-param", "12")
    assert res.exit_code == 0, res.output
    ranks = {t["rank"] for t in json.loads((out / "lplr_manifest.json").read_text())["tensors"]}
    assert ranks == {3}


@pytest.mark.parametrize("command", [[], ["calibrate"]])
def test_an_empty_out_path_is_refused(tmp_path, src, command, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = sorted(os.listdir(tmp_path))
    error_line(run_cli(*command, "--in-path", str(src), "--out-path", ""), "--out-path is empty")
    assert sorted(os.listdir(tmp_path)) == before


def test_a_path_too_long_is_a_one_line_error(tmp_path, src):
    error_line(run_cli("--in-path", str(src), "--out-path", str(tmp_path / ("x" * 300)), "--no-report"),
               "path is too long", "shorter path")
    error_line(run_cli("verify", "--in-path", str(tmp_path / ("y" * 300))), "too long")


def test_ctrl_c_during_the_report_says_the_conversion_is_complete_and_leaves_no_truncated_plot(tmp_path, src,
                                                                                               monkeypatch):
    from matplotlib.figure import Figure

    from lplr_convert import constants as C
    from lplr_convert.verify import verify

    def interrupted(self, fname, *a, **kw):
        with open(fname, "wb") as f:
            f.write(b"\x89PNG\r\n")  # a few bytes, then the user's Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", interrupted)
    out = tmp_path / "out"
    res = run_cli("--in-path", str(src), "--out-path", str(out), "--method", "rtn")
    assert res.exit_code == 130 and "Traceback" not in res.output
    assert "complete" in res.stderr and "lplr-convert report" in res.stderr and "--resume needed" in res.stderr
    assert not [p for p in out.iterdir() if p.suffix == ".png" or p.name.endswith(C.PARTIAL_SUFFIX)]
    monkeypatch.undo()
    assert run_cli("report", "--in-path", str(out)).exit_code == 0
    verify(out)


@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
def test_float16_scales_that_would_underflow_fall_back_to_float32(scheme):
    from lplr_convert.math import quantize as qz

    torch.manual_seed(0)
    W = torch.randn(64, 128) * 1e-7
    spec = qz.QuantSpec((64, 128), 8, scheme=scheme, scale_dtype="float16")
    q = qz.quantize_spec(W, spec)
    err = float((qz.dequantize(q) - W).norm() / W.norm())
    exact = qz.quantize_spec(W, qz.QuantSpec((64, 128), 8, scheme=scheme, scale_dtype="float32"))
    assert q.spec.scale_dtype == "float32" and q.scale.dtype == torch.float32  # the spec says what is stored
    assert err < 0.01 and err == pytest.approx(float((qz.dequantize(exact) - W).norm() / W.norm()))
    normal = qz.quantize_spec(W * 1e6, spec)  # scales well inside float16 stay float16
    assert normal.spec.scale_dtype == "float16"


@pytest.mark.parametrize("suffix,text", [(".yaml", "method: rtn\nmethod: lplr\n"),
                                         (".json", '{"defaults": {"method": "rtn", "method": "lplr"}}')])
def test_a_recipe_that_repeats_a_key_is_refused(tmp_path, src, suffix, text):
    recipe = tmp_path / f"r{suffix}"
    recipe.write_text(text)
    error_line(run_cli("--in-path", str(src), "--out-path", str(tmp_path / "out"), "--recipe", str(recipe)),
               "'method' appears twice")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("tensors,needles", [
    ({"w": torch.zeros(2), "x": _Evil()}, ["refused by the safe loader", "posix.system"]),
    ({NAME: torch.eye(4).to_sparse()}, ["sparse", NAME, "dense"]),
    ({NAME: torch.empty(4, 4, device="meta")}, ["meta tensor", NAME]),
])
def test_bin_files_with_code_sparse_or_meta_tensors_are_named(tmp_path, tensors, needles):
    src = tmp_path / "src"
    src.mkdir()
    torch.save(tensors, src / "pytorch_model.bin")
    (src / "config.json").write_text('{"model_type": "llama"}')
    line = error_line(run_cli("--in-path", str(src), "--out-path", str(tmp_path / "out"), "--no-report"), *needles)
    assert "damaged" not in line and "unexpected" not in line


def test_damp_0_on_singular_statistics_is_named():
    from lplr_convert.errors import LplrError
    from lplr_convert.methods import get_method, make_settings
    from lplr_convert.methods.base import InputStats

    torch.manual_seed(0)
    X = torch.randn(4, 16)
    H = X.T @ X / 4  # 4 tokens for 16 inputs: rank 4, no dead input
    with pytest.raises(LplrError, match="singular.*--damp 0.*larger --damp"):
        get_method("gptq").compress(torch.randn(8, 16), make_settings("gptq", damp=0.0), 0, InputStats(H, "k"))
