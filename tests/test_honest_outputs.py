"""A conversion that reports success wrote an output that is right: every tensor a loader returns is finite where the
source was, the recorded error is the error of exactly that tensor, stored names never collide, the tool's own
files are never copied from a source, and the loaders check the config a model is built from."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from lplr_testing import error_line, run_cli, tiny_checkpoint, tree_state

from lplr_convert import LplrError, load_model, load_state_dict
from lplr_convert import constants as C
from lplr_convert.io.manifest import read_manifest
from lplr_convert.math.error import relative_error
from lplr_convert.verify import verify

NAME = "model.layers.0.mlp.up_proj.weight"


def _records(out) -> dict[str, dict]:
    return {r["name"]: r for r in read_manifest(out)["tensors"]}


def _block(top: float, corner: float, dtype: torch.dtype) -> torch.Tensor:
    """32 x 24 with blocks [[top, top], [top, corner * top]]: with corner = 0, the best rank-1 approximation of
    [[1, 1], [1, 0]] puts (1 + sqrt 5) / 2 * 0.851^2 = 1.17 in the top-left block, 17 % above the largest value."""
    pattern = torch.tensor([[1.0, 1.0], [1.0, corner]], dtype=torch.float64)
    return (top * torch.kron(pattern, torch.ones(16, 12, dtype=torch.float64))).to(dtype)


# (dtype, largest value, corner, methods whose rank-1 output cannot be finite, methods that compress it fine).
# rtn with an integer zero point and a float16 scale (the default grid) rounds the scale up to 4368 and decodes
# 15 x 4368 = 65520 = inf in float16: refused like the others; the published min-max grid, whose top level is the
# largest value itself, compresses it fine.
NEAR_LIMIT = [
    (torch.float16, 65504.0, 0.0, ["lplr", "lsvd", "dsvd", "laser", "rtn"], ["rtn --scheme minmax"]),
    (torch.bfloat16, 4e37, 0.0, ["lsvd", "laser"], ["rtn"]),
    (torch.float32, 3e38, -1.0, ["lplr", "lsvd", "dsvd", "laser", "rtn"], []),  # hi - lo overflows rtn's scale
]


@pytest.mark.parametrize(("dtype", "top", "corner", "refused", "fine"), NEAR_LIMIT,
                         ids=[str(c[0]).removeprefix("torch.") for c in NEAR_LIMIT])
def test_values_near_the_dtype_limit_are_refused_or_copied_never_inf(tmp_path, dtype, top, corner, refused, fine):
    W = _block(top, corner, dtype)
    src = tiny_checkpoint(tmp_path / "src", {NAME: W})
    sibling = tiny_checkpoint(tmp_path / "sibling", {NAME: W})
    before = tree_state(src, sibling)
    for method in refused + fine:
        out = tmp_path / f"out_{method.replace(' ', '_')}"
        name, *extra = method.split()
        args = ["--in-path", str(src), "--out-path", str(out), "--no-report", "--method", name, *extra]
        args += ["--rank", "1"] if name != "rtn" else []
        res = run_cli(*args)
        if method in refused:
            error_line(res, NAME, "largest |value|", "--on-nonfinite copy")
            assert not (out / C.MANIFEST_FILE).exists()
            res = run_cli(*args, "--overwrite", "--on-nonfinite", "copy")
            said = res.stdout + res.stderr  # the summary says what happened to a finite source: no "held NaN/inf"
            assert "could not be compressed to finite values" in said and "held NaN/inf and" not in said, said
        assert res.exit_code == 0, res.output
        got = load_state_dict(out)[NAME]
        assert bool(torch.isfinite(got).all()), method
        rec = _records(out)[NAME]
        if method in refused:  # copied verbatim, and the record says why
            assert rec["method"] == "copy" and rec["nonfinite"]
            assert any(why in rec["reason"] for why in ("not finite", "linear algebra failed")), rec["reason"]
            assert torch.equal(got, W)
        else:
            assert rec["method"] == name
            assert rec["rel_error"] == float(relative_error(W, got, block_rows=1 << 30))
        assert run_cli("verify", "--in-path", str(out), "--source", str(src)).exit_code == 0
    assert tree_state(src, sibling) == before


def test_factors_that_overflow_the_source_dtype_are_refused(tmp_path):
    """[60000 | 65504] halves: the product is representable, but LPLR's left factor (W S) exceeds fp16, and
    load_model(factored=True) would hand it back in fp16."""
    W = torch.full((32, 24), 60000.0)
    W[:, :12] = 65504
    src = tiny_checkpoint(tmp_path / "src", {NAME: W.half()})
    error_line(run_cli("--in-path", str(src), "--out-path", str(tmp_path / "o"), "--no-report"), NAME,
               "factors that are not finite in float16")


SETTINGS = {
    "rtn4": ["--method", "rtn", "--b0", "4"],
    "lplr_full16": ["--method", "lplr", "--rank-fraction", "1", "--b1", "16", "--b2", "16"],
    "lplr_full32": ["--method", "lplr", "--rank-fraction", "1", "--b1", "32", "--b2", "32"],
    "lsvd": ["--method", "lsvd"],
    "dsvd_group": ["--method", "dsvd", "--quantizer", "group", "--group-size", "8"],
    "laser": ["--method", "laser", "--rho", "0.5"],
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_recorded_error_is_the_error_of_the_loaded_tensor(tmp_path, dtype):
    g = torch.Generator().manual_seed(5)
    w = {NAME: torch.randn(40, 24, generator=g).to(dtype), "model.layers.0.mlp.down_proj.weight":
         torch.zeros(24, 40, dtype=dtype)}
    src = tiny_checkpoint(tmp_path / "src", w)
    for key, extra in SETTINGS.items():
        out = tmp_path / key
        res = run_cli("--in-path", str(src), "--out-path", str(out), "--no-report", *extra)
        assert res.exit_code == 0, res.output
        got, recs = load_state_dict(out), _records(out)
        # the same float64 reduction as the conversion (one block of rows): the two numbers are computed alike
        assert recs[NAME]["rel_error"] == float(relative_error(w[NAME], got[NAME], block_rows=1 << 30)), key
        assert torch.equal(got["model.layers.0.mlp.down_proj.weight"], w["model.layers.0.mlp.down_proj.weight"])
        assert recs["model.layers.0.mlp.down_proj.weight"]["rel_error"] == 0.0, key  # zero matrix, exact
        res = run_cli("verify", "--in-path", str(out), "--source", str(src))
        assert res.exit_code == 0, (key, res.output)


def test_conv1d_recorded_error_is_measured_in_the_source_orientation(tiny_gpt2_dir, tmp_path):
    out = tmp_path / "out"
    res = run_cli("--in-path", str(tiny_gpt2_dir), "--out-path", str(out), "--no-report", "--b1", "16", "--b2", "16")
    assert res.exit_code == 0, res.output
    res = run_cli("verify", "--in-path", str(out), "--source", str(tiny_gpt2_dir), "--sample", "100")
    assert res.exit_code == 0, res.output


def test_energy_policy_on_an_all_zero_matrix_keeps_one_component(tmp_path):
    src = tiny_checkpoint(tmp_path / "src", {NAME: torch.zeros(64, 64)})
    for method in ("lplr", "laser"):
        out = tmp_path / method
        res = run_cli("--in-path", str(src), "--out-path", str(out), "--no-report", "--method", method,
                      "--energy", "0.9")
        assert res.exit_code == 0, res.output
        rec = _records(out)[NAME]
        assert rec["rank"] == 1 and rec["rel_error"] == 0.0
        assert torch.equal(load_state_dict(out)[NAME], torch.zeros(64, 64))


def test_errors_inside_a_method_name_the_tensor(tmp_path, monkeypatch):
    """An LplrError a method raises while compressing (e.g. a data-dependent rank) comes out naming the tensor."""
    from lplr_convert.methods import get_method

    def fail(W, settings, seed, stats=None):
        raise LplrError("the spectrum is too flat for this policy; choose another")

    monkeypatch.setattr(get_method("lsvd"), "compress", fail)
    src = tiny_checkpoint(tmp_path / "src", {NAME: torch.randn(8, 4)})
    error_line(run_cli("--in-path", str(src), "--out-path", str(tmp_path / "o"), "--no-report", "--method", "lsvd"),
               f"{NAME}: the spectrum is too flat")


@pytest.mark.parametrize("b1", ["8", "16"])
def test_stored_name_collisions_are_refused_naming_both_tensors(tmp_path, b1):
    part = "lplr_left.scale" if b1 == "8" else "lplr_left"
    other = f"{NAME}.{part}"
    src = tiny_checkpoint(tmp_path / "src", {NAME: torch.randn(16, 8), other: torch.randn(16, 1)})
    before = tree_state(src)
    for cmd in (["--out-path", str(tmp_path / "o"), "--no-report", "--b1", b1], ["inspect", "--b1", b1]):
        args = [*cmd, "--in-path", str(src)] if cmd[0] == "inspect" else ["--in-path", str(src), *cmd]
        error_line(run_cli(*args), NAME, other, "would share a stored name", "--exclude")
    assert tree_state(src) == before and not (tmp_path / "o").exists()
    res = run_cli("--in-path", str(src), "--out-path", str(tmp_path / "o"), "--no-report", "--exclude", "up_proj")
    assert res.exit_code == 0, res.output


def _plan(names_shapes: dict, method: str = "lplr", config: dict | None = None):
    from lplr_convert.io.reader import TensorHeader
    from lplr_convert.methods import flat_defaults
    from lplr_convert.methods.base import overlay
    from lplr_convert.pipeline.plan import PlanOptions, make_plan

    headers = [TensorHeader(n, shape, torch.float32, "model.safetensors") for n, shape in names_shapes.items()]
    return make_plan(headers, config or {"model_type": "llama"}, PlanOptions(overlay(flat_defaults(),
                                                                                        {"method": method})))


def test_collision_rule_follows_the_stored_name_grammar():
    """A stored name is "<name>.<part>[.<field>]" (experts: "<name>.<e>.<part>[.<field>]"); a part "" is the head
    itself. Names merely sharing a prefix (X.weight.foo beside laser's X.weight, lplr_left-x) do not collide."""
    ok = [({NAME: (16, 8), f"{NAME}.foo": (3,)}, "laser"), ({NAME: (16, 8), f"{NAME}.lplr_left-x": (3,)}, "lplr"),
          ({NAME: (16, 8), f"{NAME}.lplr_leftover": (3,)}, "lplr")]
    for tensors, method in ok:
        _plan(tensors, method)
    experts = "model.layers.0.mlp.experts.down_proj"
    bad = [({NAME: (16, 8), f"{NAME}.lplr_right.packed": (3,)}, "lplr", {}),
           ({NAME: (16, 8), f"{NAME}.lplr_q": (3,)}, "rtn", {}),
           ({experts: (4, 16, 8), f"{experts}.2.lplr_left.zero": (3,)}, "lplr", {"num_local_experts": 4}),
           ({experts: (4, 16, 8), f"{experts}.3": (3,)}, "laser", {"num_local_experts": 4})]
    for tensors, method, cfg in bad:
        first, second = tensors
        with pytest.raises(LplrError, match=f"{first} and {second} would share a stored name"):
            _plan(tensors, method, {"model_type": "llama", **cfg})


def test_a_source_holding_the_tools_own_file_names_converts_and_verifies(tmp_path):
    src = tiny_checkpoint(tmp_path / "src", {NAME: torch.randn(16, 8)})
    own = {C.MANIFEST_FILE: "{junk", C.PROGRESS_FILE: "{}", C.REPORT_JSON: "{}", C.REPORT_CSV: "a,b",
           C.REPORT_MD: "# old", C.PLOT_SPECTRUM: "png", C.LOCK_FILE: "pid 1"}
    for name, text in own.items():
        (src / name).write_text(text)
    before = tree_state(src)
    out = tmp_path / "out"
    res = run_cli("--in-path", str(src), "--out-path", str(out))
    assert res.exit_code == 0, res.output
    assert "not copied" in res.stderr
    files = read_manifest(out)["files"]
    assert not set(files) & set(own)
    assert json.loads((out / C.MANIFEST_FILE).read_text())["tool"] == C.TOOL_NAME
    assert (out / C.REPORT_MD).read_text() != "# old"  # the report is this run's
    assert verify(out, source=str(src))["errors_checked"]
    assert tree_state(src) == before


def test_reconverting_an_output_is_refused_and_its_decompressed_form_converts(tiny_llama_dir, tmp_path):
    conv = tmp_path / "conv"
    assert run_cli("--in-path", str(tiny_llama_dir), "--out-path", str(conv), "--no-report").exit_code == 0
    for args in (["--in-path", str(conv), "--out-path", str(tmp_path / "again")], ["inspect", "--in-path", str(conv)]):
        error_line(run_cli(*args), "is an lplr-convert output", "decompress")
    # the same when only the manifest tells (a Hub repo holding an output with a config rewritten by hand)
    copy = shutil.copytree(conv, tmp_path / "copy")
    cfg = json.loads((copy / C.CONFIG_FILE).read_text())
    del cfg["quantization_config"]
    (copy / C.CONFIG_FILE).write_text(json.dumps(cfg))
    error_line(run_cli("inspect", "--in-path", str(copy)), "is an lplr-convert output")
    dense = tmp_path / "dense"
    assert run_cli("decompress", "--in-path", str(conv), "--out-path", str(dense)).exit_code == 0
    res = run_cli("--in-path", str(dense), "--out-path", str(tmp_path / "again"), "--no-report")
    assert res.exit_code == 0, res.output
    verify(tmp_path / "again", source=str(dense))


def test_load_model_checks_the_config_it_builds_from(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    assert run_cli("--in-path", str(tiny_llama_dir), "--out-path", str(out), "--no-report").exit_code == 0
    load_model(out)  # intact
    cfg_path = out / C.CONFIG_FILE
    original = cfg_path.read_text()
    cfg_path.write_text(original.replace('"hidden_act": "silu"', '"hidden_act": "gelu"'))
    assert cfg_path.read_text() != original
    with pytest.raises(LplrError, match=r"config\.json does not match the sha256"):
        load_model(out)
    with pytest.raises(LplrError, match=r"config\.json does not match the sha256"):
        load_model(out, factored=False)
    assert load_state_dict(out).keys()  # the dense weights do not depend on the config
    load_model(out, verify=False)  # checking can be turned off, as for the shards
    cfg_path.write_text(original)
    load_model(out)
