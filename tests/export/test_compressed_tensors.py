"""compressed-tensors export: lossless packing (checked with compressed-tensors' own decompressor), the
quantization_config (validated by its own schema), what goes dense and why, and transformers loading the export in a
fresh interpreter that never imports lplr_convert, with outputs equal to the tool's own model."""

from __future__ import annotations

import json

import pytest
import torch
from export_testing import convert_to, forward, record_of, rounded_reference

from lplr_convert import constants as C
from lplr_convert.errors import LplrError
from lplr_convert.export import export
from lplr_convert.export.compressed_tensors import pack_quantized
from lplr_convert.math import quantize as qz

pytest.importorskip("compressed_tensors")
EXPORTED = ("rtn4_group", "gptq4_channel_asym", "rtn4_tensor_asym", "rtn8_channel", "mixed", "mixed_dequantize",
            "qlr_minilm_base", "gptq_mixtral", "gptq_mixtral_dequantize", "gptq_falcon")


# ----------------------------------------------------------------------------------------- packing (in-process)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize(("granularity", "scheme"), [("group", "symmetric"), ("group", "asymmetric"),
                                                     ("channel", "asymmetric"), ("tensor", "asymmetric"),
                                                     ("tensor", "symmetric")])
def test_compressed_tensors_decompresses_our_fields_exactly(bits, granularity, scheme):
    """compressed-tensors' own PackedQuantizationCompressor decodes our fields to our dequantized matrix, rounded once
    to the scale dtype it computes in (exact: |c - zp| < 2**8 times an 11-bit float16 significand fits float32)."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    from lplr_convert.export.common import scheme_of
    from lplr_convert.export.compressed_tensors import _weights

    W = torch.randn(40, 96, generator=torch.Generator().manual_seed(bits))
    spec = qz.QuantSpec((40, 96), bits, granularity, 0, 32 if granularity == "group" else None, scheme=scheme,
                        scale_dtype="float16")
    q = qz.quantize_spec(W, spec)
    ct_scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**_weights(scheme_of(q.spec))))
    decoded = PackedQuantizationCompressor.decompress(pack_quantized(q), ct_scheme)["weight"]
    assert decoded.dtype == torch.float16
    assert torch.equal(decoded, qz.dequantize(q).to(torch.float16))


# ------------------------------------------------------------------------------------ config and dense report


def test_mixed_recipe_keeps_one_scheme_packed(exports):
    """transformers 5.25 decodes every module of a dequantize=True load with its first config group's scheme (a
    second group loaded silently wrong, 1.7x the output scale on this Llama): the scheme holding the most parameters
    (4-bit groups of 32 for the MLP) stays packed, the 8-bit attention goes dense, saying why."""
    from compressed_tensors.quantization import QuantizationConfig

    case = exports["cases"]["mixed"]
    qc = json.loads((case.ct / C.CONFIG_FILE).read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(qc)  # compressed-tensors' own schema accepts it
    assert [(g.targets, g.weights.num_bits, g.weights.strategy, g.weights.group_size)
            for g in parsed.config_groups.values()] == [(["Linear"], 4, "group", 32)]
    assert sorted(record_of(case.ct)["packed"]) == [f"model.layers.{i}.mlp.{m}_proj.weight" for i in (0, 1)
                                                    for m in ("gate", "up")]
    for name in ("lm_head", "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj",
                 "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.v_proj"):
        assert name in qc["ignore"]
    dense = {d["name"]: d["reason"] for d in record_of(case.ct)["dense"]}
    assert dense["model.layers.0.self_attn.q_proj.weight"] == (
        "its scheme (8-bit symmetric channel) is not the export's one packed scheme (4-bit symmetric group 32): "
        "transformers decodes every module with one config group's scheme")
    assert C.CONFIG_WEIGHTS_KEY not in json.loads((case.ct / C.CONFIG_FILE).read_text())  # no import guard left


def test_non_exportable_tensors_go_dense_with_their_reason(exports):
    dense = {d["name"]: d["reason"] for d in record_of(exports["cases"]["mixed"].ct)["dense"]}
    assert "stores no integer-quantized" in dense["model.layers.0.self_attn.o_proj.weight"]  # lsvd
    assert "group size 64 does not divide its 96 input columns" in dense["model.layers.0.mlp.down_proj.weight"]
    assert "minmax" in dense["model.layers.1.self_attn.v_proj.weight"]
    assert "model.layers.0.mlp.up_proj.weight" not in dense
    assert dense["model.norm.weight"] == "copied by the conversion"


def test_nothing_packable_is_refused(llama32_dir, tmp_path):
    dst = convert_to(llama32_dir, tmp_path / "lsvd", method="lsvd", rank=4, layers="0")
    with pytest.raises(LplrError, match="holds no weight compressed-tensors can store packed"):
        export(dst, tmp_path / "ct", "compressed-tensors")
    assert not (tmp_path / "ct").exists() or not any((tmp_path / "ct").iterdir())


# ---------------------------------------------------------------- loading in a fresh interpreter (no lplr_convert)


def test_loader_process_never_imported_lplr_convert(exports):
    assert exports["lplr_modules"] == []


@pytest.mark.parametrize("name", EXPORTED)
def test_transformers_weights_equal_the_tools_decode(exports, name):
    """Every weight transformers + compressed-tensors reconstruct equals the tool's own, bit for bit: packed ones as
    the tool decodes them (rounded where compressed-tensors computes in the scale dtype), dense ones as stored."""
    case = exports["cases"][name]
    qlr = name.startswith("qlr")
    ref = dict(rounded_reference(case, factored=qlr, drop_corrections=qlr).named_parameters())
    loaded = case.loaded["weights"]
    packed_linears = {p for p in record_of(case.ct)["packed"] if p in ref}  # not per-expert weights fused on load
    assert set(loaded) <= set(ref) and packed_linears and packed_linears <= set(loaded)
    for pname, w in loaded.items():
        assert torch.equal(w, ref[pname]), pname


@pytest.mark.parametrize("name", EXPORTED)
def test_transformers_outputs_equal_the_tools_model(exports, name):
    """Identical weights in the same transformers modules: the outputs are identical, no tolerance (the qlr base is
    its backbones Q alone, the tool's model without its corrections)."""
    case = exports["cases"][name]
    ref = rounded_reference(case, factored=name.startswith("qlr"), drop_corrections=name.startswith("qlr"))
    assert torch.equal(case.loaded["output"], forward(ref, case.ids))


def test_fp16_scale_products_stay_within_one_rounding(exports):
    """With dequantize=True compressed-tensors computes (q - z) * s in float16: each weight within half a float16
    ulp of the tool's exact float32 decode, |dw| <= 2**-11 |w| (+ 2**-25 below the normal range)."""
    from lplr_convert import load_state_dict

    case = exports["cases"]["gptq4_channel_asym"]
    ours = load_state_dict(case.dst)
    for name in record_of(case.ct)["packed"]:
        w, w_ct = ours[name], case.loaded["weights"][name]
        assert bool(((w_ct - w).abs() <= w.abs() * 2.0**-11 + 2.0**-25).all()), name
    assert any(not torch.equal(ours[n], case.loaded["weights"][n]) for n in record_of(case.ct)["packed"])


# ----------------------------------------------------------------------- families transformers loads its own way


def test_mixtral_experts_are_packed_per_expert(exports):
    case = exports["cases"]["gptq_mixtral"]
    packed = record_of(case.ct)["packed"]
    assert len(packed) == 4 + 4 * 3 and "model.layers.0.block_sparse_moe.experts.3.w2.weight" in packed
    assert record_of(case.ct)["notes"] == []  # symmetric, 4-bit groups: transformers' default path loads it


@pytest.mark.parametrize(("knobs", "problem"), [
    ({"method": "rtn", "b0": 4}, "asymmetric: transformers decodes packed experts without zero points"),
    ({"method": "qlr", "b0": 4, "rank": 4, "iters": 1, "scheme": "symmetric", "quantizer": "group", "group_size": 32},
     "a qlr correction, which neither a compressed-tensors base nor a LoRA adapter holds there"),
    ({"method": "rtn", "b0": 4, "scheme": "symmetric", "types": "attn"}, "copied by the conversion")])
def test_mixtral_experts_that_transformers_cannot_read_are_refused(mixtral_dir, tmp_path, knobs, problem):
    """Its experts path reads packed weights only (dense ones are dropped: the merge stops on an empty list) and
    without zero points; a qlr correction has no place in either export."""
    dst = convert_to(mixtral_dir, tmp_path / "dst", **knobs)
    for fmt in ("compressed-tensors", "peft"):
        with pytest.raises(LplrError) as err:
            export(dst, tmp_path / fmt, fmt)
        assert str(err.value).startswith("model.layers.0.block_sparse_moe.experts.0.w1.weight: transformers merges")
        assert f"({problem})" in str(err.value) and "\n" not in str(err.value)


def test_llama4_experts_that_transformers_rebuilds_are_refused(tmp_path):
    """For compressed-tensors checkpoints transformers builds Llama 4's fused experts as per-expert linears, which
    the fused tensors do not fill: without the refusal they loaded random (6e-2 of the output scale)."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    torch.manual_seed(0)
    Llama4ForCausalLM(Llama4TextConfig(
        hidden_size=64, intermediate_size=96, intermediate_size_mlp=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=96, num_local_experts=2, num_experts_per_tok=1, head_dim=16,
        interleave_moe_layer_step=1, no_rope_layers=[1], attention_chunk_size=32)).save_pretrained(tmp_path / "src")
    dst = convert_to(tmp_path / "src", tmp_path / "dst", method="gptq", b0=4, scheme="symmetric", quantizer="group",
                     group_size=32)
    with pytest.raises(LplrError, match=r"transformers loads Llama4TextExperts \(model\.layers\.0\.feed_forward\."
                                        r"experts\) of a compressed-tensors checkpoint as SequentialLlama4TextExperts"):
        export(dst, tmp_path / "ct", "compressed-tensors")


def test_models_whose_init_reads_packed_weights_are_told_to_dequantize(exports, tmp_path):
    """T5's and Falcon's weight init reads the `weight` of linears that transformers' default compressed-tensors path
    has removed (AttributeError); Llama's guards it: only the former get the note."""
    from transformers import T5Config, T5ForConditionalGeneration

    assert any("FalconForCausalLM reads the weight of packed linears" in n
               for n in record_of(exports["cases"]["gptq_falcon"].ct)["notes"])
    assert not any("reads the weight" in n for n in record_of(exports["cases"]["rtn4_group"].ct)["notes"])
    torch.manual_seed(0)
    T5ForConditionalGeneration(T5Config(d_model=64, d_ff=96, num_layers=1, num_heads=4, d_kv=16, vocab_size=96)) \
        .save_pretrained(tmp_path / "t5")
    dst = convert_to(tmp_path / "t5", tmp_path / "dst", method="gptq", b0=4, scheme="symmetric", quantizer="group",
                     group_size=32)
    notes = export(dst, tmp_path / "ct", "compressed-tensors").notes
    assert any(n.startswith("T5ForConditionalGeneration reads the weight of packed linears") and
               "CompressedTensorsConfig(dequantize=True)" in n for n in notes)
