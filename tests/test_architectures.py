"""Tiny real models of several families: convert, then factored and dense loading reproduce the original model.

Full rank with 16-bit factors (LSVD) makes the converted model numerically the original one, so the outputs of
both loaders must match the source model's to fp16 precision; this checks names, orientation, tying and the
loaders' handling of each family (GQA, fused qkv, encoder-decoder, MoE weights that transformers renames on load).
"""

from __future__ import annotations

import pytest
import torch
from lplr_testing import run_cli

from lplr_convert import load_model
from lplr_convert.io.manifest import read_manifest

H = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
     "vocab_size": 128, "max_position_embeddings": 64}


def _cases():
    import transformers as T

    return {
        "mistral": (lambda: T.MistralConfig(**H, num_key_value_heads=2), "MistralForCausalLM"),
        "gpt_neox": (lambda: T.GPTNeoXConfig(**H), "GPTNeoXForCausalLM"),
        "t5": (lambda: T.T5Config(d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16, vocab_size=128),
               "T5ForConditionalGeneration"),
        "mixtral": (lambda: T.MixtralConfig(**H, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
                    "MixtralForCausalLM"),
        "opt": (lambda: T.OPTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                                    vocab_size=128, max_position_embeddings=64, word_embed_proj_dim=64),
                "OPTForCausalLM"),
        "falcon": (lambda: T.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128),
                   "FalconForCausalLM"),
        # one layer group whose weights every layer shares: compressed once, used by all
        "albert": (lambda: T.AlbertConfig(**H, embedding_size=32), "AlbertForMaskedLM"),
    }


@pytest.mark.parametrize("family", ["mistral", "gpt_neox", "t5", "mixtral", "opt", "falcon", "albert"])
def test_family_round_trip(family, tmp_path):
    import transformers

    make_config, arch = _cases()[family]
    torch.manual_seed(0)
    model = getattr(transformers, arch)(make_config()).eval()
    src = tmp_path / "src"
    model.save_pretrained(src)
    out = tmp_path / "out"
    res = run_cli("--in-path", str(src), "--out-path", str(out), "--method", "lsvd", "--b1", "16", "--b2", "16",
                  "--rank-fraction", "1.0", "--no-report")
    assert res.exit_code == 0, res.output
    records = read_manifest(out)["tensors"]
    compressed = [r for r in records if r["method"] != "copy"]
    assert compressed and all(r["layer"] is not None for r in compressed)
    assert not [r for r in compressed if r["matrix_type"] in ("other", "router")]
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    kwargs = {"input_ids": ids, **({"decoder_input_ids": ids} if family == "t5" else {})}
    with torch.no_grad():
        ref = model(**kwargs).logits
        for factored in (True, False):
            loaded = load_model(out, factored=factored)
            n_lowrank = sum(type(m).__name__ == "LowRankLinear" for m in loaded.modules())
            assert (n_lowrank > 0) == factored
            got = loaded(**kwargs).logits
            assert (got - ref).abs().max() < 2e-3 * ref.abs().max(), (family, factored)


@pytest.mark.parametrize(("name", "layer", "mtype"), [
    ("albert.encoder.albert_layer_groups.0.albert_layers.0.attention.query.weight", 0, "q_proj"),
    ("albert.encoder.albert_layer_groups.0.albert_layers.0.attention.dense.weight", 0, "out_proj"),
    ("albert.encoder.albert_layer_groups.0.albert_layers.0.ffn.weight", 0, "fc_in"),
    ("albert.encoder.albert_layer_groups.0.albert_layers.0.ffn_output.weight", 0, "fc_out"),
    ("albert.encoder.embedding_hidden_mapping_in.weight", None, None),
    ("encoder.layer.1.attention.self.query_proj.weight", 1, "q_proj"),
    ("encoder.layer.1.attention.self.key_proj.weight", 1, "k_proj"),
    ("encoder.layer.1.attention.self.value_proj.weight", 1, "v_proj"),
])
def test_block_and_matrix_type_names(name, layer, mtype):
    """ALBERT's shared layer group is block 0 (its weights are compressed, not silently copied); DeBERTa's
    projections have their types."""
    from lplr_convert.pipeline.plan import block_index, matrix_type

    assert (block_index(name), matrix_type(name)) == (layer, mtype)
