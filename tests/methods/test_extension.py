"""A method is one unit: a throw-away method with a knob of its own, registered from this file alone, shows up in
`convert --help`, is accepted in a recipe and on the command line, converts a tiny model, round-trips through the
loader, and appears with its knob in the manifest, the report and `inspect` (no package file knows about it)."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass

import pytest
import torch
from lplr_testing import run_cli

from lplr_convert import constants as C
from lplr_convert.io.manifest import read_manifest
from lplr_convert.hf.loading import load_state_dict
from lplr_convert.math import quantize as qz
from lplr_convert.methods import Method, MethodResult, available_methods, knob, register
from lplr_convert.methods.base import unregister
from lplr_convert.methods.settings import BitsKnob, QuantKnobs

NAME = "clipped_rtn"


@dataclass(frozen=True)
class ClippedSettings(BitsKnob, QuantKnobs):
    clip_ratio: float = knob(1.0, type=float, label="always", help="Clip |W| to this fraction of its max first.")

    def _check(self) -> None:
        if not 0 < self.clip_ratio <= 1:
            raise ValueError("clip_ratio must be in (0, 1]")


class ClippedRTN(Method):
    settings_cls = ClippedSettings
    parts = ("clipped",)

    def compress(self, W, settings, seed, stats=None):
        Wf = W.float()
        bound = settings.clip_ratio * Wf.abs().max()
        q = qz.quantize(Wf.clamp(-bound, bound), settings.b0, settings.quantizer, 0, settings.group_size)
        W_hat = qz.dequantize(q)
        err = float((Wf - W_hat).norm() / Wf.norm())
        parts = {f"clipped.{k}" if k else "clipped": v for k, v in qz.to_fields(q).items()}
        return MethodResult(parts, {"q": q.spec.to_json()}, qz.stored_bits(q.spec), err)

    def decode(self, parts, info):
        fields = {k.removeprefix("clipped").lstrip("."): v for k, v in parts.items()}
        return qz.dequantize(qz.from_fields(fields, qz.QuantSpec.from_json(info["q"])))

    def predict(self, shape, dtype, settings, calibrated=False):
        spec = qz.QuantSpec(tuple(shape), settings.b0, settings.quantizer, 0, settings.group_size)
        return None, {f"clipped.{k}" if k else "clipped": v for k, v in qz.field_specs(spec).items()}


@pytest.fixture
def clipped():
    register(NAME)(ClippedRTN)
    yield NAME
    unregister(NAME)


def test_a_new_method_with_a_new_knob_needs_no_package_edit(clipped, tiny_llama_dir, tmp_path):
    assert clipped in available_methods()
    help_text = run_cli("convert", "--method", NAME, "--help").output
    assert "--clip-ratio" in help_text and "Clip |W| to this fraction" in help_text and NAME in help_text

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"rules:\n  - {{pattern: 'mlp\\.', method: {NAME}, clip_ratio: 0.5, b0: 4}}\n")
    out = tmp_path / "out"
    res = run_cli("--in-path", str(tiny_llama_dir), "--out-path", str(out), "--recipe", str(recipe), "--no-report")
    assert res.exit_code == 0, res.output
    recs = {r["name"]: r for r in read_manifest(out)["tensors"]}
    rec = recs["model.layers.0.mlp.up_proj.weight"]
    assert rec["method"] == NAME and rec["settings"]["clip_ratio"] == 0.5 and rec["b0"] == 4
    assert recs["model.layers.0.self_attn.q_proj.weight"]["method"] == "lplr"  # the default for the rest
    state = load_state_dict(out)
    src = {}
    from safetensors import safe_open

    for f in tiny_llama_dir.glob("*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            src.update({k: sf.get_tensor(k) for k in sf.keys()})  # noqa: SIM118 (safe_open is no dict)
    W = src["model.layers.0.mlp.up_proj.weight"].float()
    bound = 0.5 * W.abs().max()
    assert state["model.layers.0.mlp.up_proj.weight"].float().abs().max() <= bound * (1 + 1e-2)  # bf16 rounding
    got = float((W - state["model.layers.0.mlp.up_proj.weight"].float()).norm() / W.norm())
    assert got == pytest.approx(rec["rel_error"], rel=2e-2)  # decoded in bf16 (source dtype), recorded in fp32

    report = run_cli("report", "--in-path", str(out))
    assert report.exit_code == 0, report.output
    with open(out / C.REPORT_CSV, newline="") as f:
        rows = {r["name"]: r for r in csv.DictReader(f)}
    assert rows["model.layers.0.mlp.up_proj.weight"]["clip_ratio"] == "0.5"
    assert f"{NAME} b0=4 clip_ratio=0.5" in (out / C.REPORT_MD).read_text()


def test_the_new_knob_on_the_command_line_and_in_inspect(clipped, tiny_llama_dir, tmp_path):
    res = run_cli("inspect", "--in-path", str(tiny_llama_dir), "--method", NAME, "--clip-ratio", "0.25", "--json")
    assert res.exit_code == 0, res.output
    rows = [r for r in json.loads(res.output)["tensors"] if r["method"] == NAME]
    assert rows and all(r["settings"]["clip_ratio"] == 0.25 and "clip_ratio=0.25" in r["label"] for r in rows)
    bad = run_cli("inspect", "--in-path", str(tiny_llama_dir), "--method", NAME, "--clip-ratio", "abc")
    assert bad.exit_code != 0 and "--clip-ratio" in bad.output
    out = tmp_path / "o"
    res = run_cli("--in-path", str(tiny_llama_dir), "--out-path", str(out), "--method", NAME, "--clip-ratio", "0.5",
                  "--no-report")
    assert res.exit_code == 0, res.output
    assert {r["settings"].get("clip_ratio") for r in read_manifest(out)["tensors"] if r["method"] != "copy"} == {0.5}


def test_unregistered_again(clipped):
    unregister(NAME)
    assert NAME not in available_methods() and "--clip-ratio" not in run_cli("convert", "--help").output
    register(NAME)(ClippedRTN)  # for the fixture's teardown


def test_python_api_round_trip(clipped):
    from lplr_convert.methods import get_method, make_settings

    s = make_settings(NAME, b0=8, clip_ratio=1.0)
    W = torch.randn(8, 8)
    res = get_method(NAME).compress(W, s, 0)
    assert torch.allclose(get_method(NAME).decode(res.parts, res.info), W, atol=float(W.abs().max()) / 127 + 1e-6)
