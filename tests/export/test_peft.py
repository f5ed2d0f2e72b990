"""PEFT export: PeftModel.from_pretrained(base from the compressed-tensors export, adapter) reproduces the qlr model
(`load_model(DST, factored=True)`) in a process that never imports lplr_convert; the adapter config gives scaling 1
for every module; conversions without a backbone are refused."""

from __future__ import annotations

import json

import pytest
import torch
from export_testing import convert_to, forward, rounded_reference

from lplr_convert import constants as C
from lplr_convert.errors import LplrError
from lplr_convert.export import export

pytest.importorskip("peft")
QLR = ("qlr_llama", "qlr_minilm", "qlr_gpt2")


def _config(case) -> dict:
    return json.loads((case.peft / C.PEFT_CONFIG_FILE).read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", QLR)
def test_base_plus_adapter_reproduces_the_qlr_model(exports, name):
    """Both compute Q x + b + L (R x) from the same float32 values, PEFT as linear(x, Q, b) + B (A x) * 1.0, the tool
    as (L (R x) + b) + Q x: only the order of the additions differs, a few float32 roundings (2**-24 relative) per
    layer, so 1e-5 of the output's scale bounds the difference with ample margin at these depths (2-6 layers)."""
    case = exports["cases"][name]
    ref = forward(rounded_reference(case, factored=True), case.ids)
    got = case.loaded["output"]
    assert got.shape == ref.shape
    assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    # the correction matters: the base alone is measurably further away than that
    base = forward(rounded_reference(case, factored=True, drop_corrections=True), case.ids)
    assert float((base - ref).abs().max()) > 1e-3 * float(ref.abs().max())


@pytest.mark.parametrize("name", QLR)
def test_every_module_has_scaling_one(exports, name):
    case = exports["cases"][name]
    assert case.loaded["scalings"] == [1.0]
    cfg = _config(case)
    ranks = json.loads((case.peft / C.EXPORT_FILE).read_text())["adapter"]
    assert cfg["r"] == cfg["lora_alpha"] == max(ranks.values())
    assert cfg["rank_pattern"] == cfg["alpha_pattern"] == ranks
    assert sorted(cfg["target_modules"]) == sorted(ranks)
    assert cfg["peft_type"] == "LORA" and cfg["bias"] == "none" and cfg["lora_dropout"] == 0.0


def test_adapter_config_and_weights_are_what_peft_reads(exports):
    from peft import LoraConfig
    from safetensors import safe_open

    case = exports["cases"]["qlr_llama"]
    cfg = LoraConfig.from_pretrained(str(case.peft))
    assert cfg.r == 8 and cfg.task_type == "CAUSAL_LM" and not cfg.fan_in_fan_out
    with safe_open(str(case.peft / C.PEFT_WEIGHTS_FILE), "pt") as f:
        A = f.get_tensor("base_model.model.model.layers.0.mlp.down_proj.lora_A.weight")
        B = f.get_tensor("base_model.model.model.layers.0.mlp.down_proj.lora_B.weight")
    assert tuple(A.shape) == (8, 96) and tuple(B.shape) == (64, 8) and A.dtype == torch.float32
    assert _config(exports["cases"]["qlr_gpt2"])["fan_in_fan_out"] is True  # GPT-2's Conv1D layers
    assert _config(exports["cases"]["qlr_minilm"])["task_type"] is None  # a BertModel


def test_gpt2_base_is_a_plain_checkpoint(exports):
    """Conv1D weights cannot be packed: the base holds the backbones Q dense, with no quantization_config."""
    case = exports["cases"]["qlr_gpt2"]
    assert "quantization_config" not in json.loads((case.ct / C.CONFIG_FILE).read_text())
    assert json.loads((case.ct / C.EXPORT_FILE).read_text())["packed"] == []


def test_base_model_is_recorded(exports, tmp_path):
    case = exports["cases"]["qlr_llama"]
    result = export(case.dst, tmp_path / "adapter", "peft", base_model=str(case.ct))
    written = json.loads((result.out / C.PEFT_CONFIG_FILE).read_text(encoding="utf-8"))
    assert written["base_model_name_or_path"] == str(case.ct)
    assert not any("base_model_name_or_path is unset" in n for n in result.notes)


def test_conversions_without_a_backbone_are_refused(llama32_dir, tmp_path):
    dst = convert_to(llama32_dir, tmp_path / "lsvd", method="lsvd", rank=4, layers="0")
    with pytest.raises(LplrError, match="for lsvd/lplr/dsvd factors that base would be zero"):
        export(dst, tmp_path / "adapter", "peft")


@pytest.mark.parametrize("base", ["", "no such/dir/at all", "../x"])
def test_a_base_model_that_is_neither_a_directory_nor_a_repo_id_is_refused(exports, tmp_path, base):
    case = exports["cases"]["qlr_llama"]
    with pytest.raises(LplrError, match="neither a local directory nor a Hub repo id"):
        export(case.dst, tmp_path / "adapter", "peft", base_model=base)
    assert not (tmp_path / "adapter").exists()
