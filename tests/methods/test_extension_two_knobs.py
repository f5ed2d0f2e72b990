"""A throw-away method with two knobs of its own (one with choices, one declared with the knob defaults: no label)
and a record field, registered from this file alone: they reach `convert --help` (the choices as a click choice), recipes, the
manifest, the report's CSV columns and Markdown, `inspect` (JSON and table) and the model card."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass

import pytest
import torch
from lplr_testing import run_cli

from lplr_convert import constants as C
from lplr_convert.publish.card import build_model_card
from lplr_convert.io.manifest import read_manifest
from lplr_convert.hf.loading import load_state_dict
from lplr_convert.math import quantize as qz
from lplr_convert.methods import Method, MethodResult, knob, register
from lplr_convert.methods.base import unregister
from lplr_convert.methods.settings import BitsKnob, QuantKnobs

NAME = "shrunk_rtn"


@dataclass(frozen=True)
class ShrunkSettings(BitsKnob, QuantKnobs):
    shrink: float = knob(1.0, type=float, label="nondefault", help="Multiply W by this before quantizing.")
    rounding: str = knob("nearest", type=str, choices=("nearest", "toward_zero"),
                         help="How W*shrink is rounded to 1/64 steps first.")


class ShrunkRTN(Method):
    settings_cls = ShrunkSettings
    parts = ("shrunk",)
    record_fields = ("shrunk_max",)

    def compress(self, W, settings, seed, stats=None):
        Wf = W.float() * settings.shrink
        Wf = torch.round(Wf * 64) / 64 if settings.rounding == "nearest" else torch.trunc(Wf * 64) / 64
        q = qz.quantize(Wf, settings.b0, settings.quantizer, 0, settings.group_size)
        W_hat = qz.dequantize(q)
        err = float((W.float() - W_hat).norm() / W.float().norm())
        parts = {f"shrunk.{k}" if k else "shrunk": v for k, v in qz.to_fields(q).items()}
        return MethodResult(parts, {"q": q.spec.to_json()}, qz.stored_bits(q.spec), err,
                            extra={"shrunk_max": float(Wf.abs().max())})

    def decode(self, parts, info):
        fields = {k.removeprefix("shrunk").lstrip("."): v for k, v in parts.items()}
        return qz.dequantize(qz.from_fields(fields, qz.QuantSpec.from_json(info["q"])))

    def predict(self, shape, dtype, settings, calibrated=False):
        spec = qz.QuantSpec(tuple(shape), settings.b0, settings.quantizer, 0, settings.group_size)
        return None, {f"shrunk.{k}" if k else "shrunk": v for k, v in qz.field_specs(spec).items()}


@pytest.fixture
def shrunk():
    register(NAME)(ShrunkRTN)
    yield NAME
    unregister(NAME)


def test_two_new_knobs_reach_help_recipe_manifest_report_inspect_and_card(shrunk, tiny_llama_dir, tmp_path):
    help_text = run_cli("convert", "--method", NAME, "--help").output
    assert "--shrink" in help_text and "--rounding [nearest|toward_zero]" in help_text
    bad = run_cli("inspect", "--in-path", str(tiny_llama_dir), "--method", NAME, "--rounding", "up")
    assert bad.exit_code != 0 and "--rounding" in bad.output

    res = run_cli("inspect", "--in-path", str(tiny_llama_dir), "--method", NAME, "--shrink", "0.5",
                  "--rounding", "toward_zero")
    assert res.exit_code == 0, res.output
    assert "shrink=0.5" in res.output and "rounding=toward_zero" in res.output  # the table shows both knobs
    res = run_cli("inspect", "--in-path", str(tiny_llama_dir), "--method", NAME, "--shrink", "0.5",
                  "--rounding", "toward_zero", "--json")
    rows = [r for r in json.loads(res.output)["tensors"] if r["method"] == NAME]
    assert rows and all(r["settings"]["shrink"] == 0.5 and r["settings"]["rounding"] == "toward_zero" for r in rows)

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"rules:\n  - {{pattern: 'mlp\\.', method: {NAME}, shrink: 0.5, rounding: toward_zero}}\n")
    out = tmp_path / "out"
    res = run_cli("--in-path", str(tiny_llama_dir), "--out-path", str(out), "--recipe", str(recipe))
    assert res.exit_code == 0, res.output
    recs = {r["name"]: r for r in read_manifest(out)["tensors"]}
    rec = recs["model.layers.0.mlp.up_proj.weight"]
    assert rec["settings"] == {"method": NAME, "b0": 8, "quantizer": "channel", "group_size": None,
                               "scheme": "asymmetric", "scale_dtype": "float16", "clip": None, "shrink": 0.5,
                               "rounding": "toward_zero"}
    assert rec["extra"]["shrunk_max"] > 0  # the declared record field
    assert "model.layers.0.mlp.up_proj.weight" in load_state_dict(out)

    with open(out / C.REPORT_CSV, newline="") as f:
        reader = csv.DictReader(f)
        assert {"shrink", "rounding", "shrunk_max"} <= set(reader.fieldnames)
        rows = {r["name"]: r for r in reader}
    assert rows["model.layers.0.mlp.up_proj.weight"]["rounding"] == "toward_zero"
    md = (out / C.REPORT_MD).read_text()
    assert "shrink=0.5" in md and "rounding=toward_zero" in md
    card = str(build_model_card(out))
    assert NAME in card and "shrink=0.5" in card and "rounding=toward_zero" in card
