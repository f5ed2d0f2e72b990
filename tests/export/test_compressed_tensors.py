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
EXPORTED = ("rtn4_group", "gptq4_channel_asym", "rtn4_tensor_asym", "rtn8_channel", "mixed", "qlr_minilm_base")


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

    from lplr_convert.export.compressed_tensors import _scheme, _weights

    W = torch.randn(40, 96, generator=torch.Generator().manual_seed(bits))
    spec = qz.QuantSpec((40, 96), bits, granularity, 0, 32 if granularity == "group" else None, scheme=scheme,
                        scale_dtype="float16")
    q = qz.quantize_spec(W, spec)
    ct_scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**_weights(_scheme(q.spec))))
    decoded = PackedQuantizationCompressor.decompress(pack_quantized(q), ct_scheme)["weight"]
    assert decoded.dtype == torch.float16
    assert torch.equal(decoded, qz.dequantize(q).to(torch.float16))


# ------------------------------------------------------------------------------------ config and dense report


def test_mixed_recipe_gives_one_config_group_per_scheme(exports):
    from compressed_tensors.quantization import QuantizationConfig

    case = exports["cases"]["mixed"]
    qc = json.loads((case.ct / C.CONFIG_FILE).read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(qc)  # compressed-tensors' own schema accepts it
    weights = {name: (g.weights.num_bits, g.weights.strategy, g.weights.group_size)
               for name, g in parsed.config_groups.items()}
    assert sorted(weights.values(), key=str) == sorted([(8, "channel", None), (4, "group", 32)], key=str)
    targets = {t for g in qc["config_groups"].values() for t in g["targets"]}
    assert "model.layers.0.self_attn.q_proj" in targets and "model.layers.1.mlp.up_proj" in targets
    for name in ("lm_head", "model.layers.0.self_attn.o_proj", "model.layers.1.mlp.down_proj",
                 "model.layers.1.self_attn.v_proj"):
        assert name in qc["ignore"] and name not in targets
    assert C.CONFIG_WEIGHTS_KEY not in json.loads((case.ct / C.CONFIG_FILE).read_text())  # no import guard left


def test_non_exportable_tensors_go_dense_with_their_reason(exports):
    dense = {d["name"]: d["reason"] for d in record_of(exports["cases"]["mixed"].ct)["dense"]}
    assert "stores no integer-quantized" in dense["model.layers.0.self_attn.o_proj.weight"]  # lsvd
    assert "group size 64 does not divide its 96 input columns" in dense["model.layers.0.mlp.down_proj.weight"]
    assert "minmax" in dense["model.layers.1.self_attn.v_proj.weight"]
    assert "model.layers.0.self_attn.v_proj.weight" not in dense
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
    assert set(loaded) <= set(ref) and {p for p in record_of(case.ct)["packed"]} <= set(loaded)
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
