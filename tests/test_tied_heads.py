"""Tied embeddings: every loader (load_model dense and factored, from_pretrained, decompress read by transformers)
gives the same model, on tied and untied families, with and without a stored head, with and without the head
compressed; the rule is transformers' own (a stored head that differs from the embedding is used)."""

from __future__ import annotations

import json

import pytest
import torch
from lplr_testing import run_cli
from safetensors.torch import load_file, save_file

HEAD = "lm_head.weight"


def _family(tmp_path, family: str, tie: bool, head: str | None):
    """A tiny checkpoint; `head`: None (as save_pretrained writes it), "same" (a stored head equal to the embedding,
    as many published checkpoints hold), "other" (a stored head of its own)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    if family == "gpt2":
        model, embed = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=48, n_layer=1, n_head=4, n_positions=32,
                                                  tie_word_embeddings=tie)), "transformer.wte.weight"
    else:
        model, embed = LlamaForCausalLM(LlamaConfig(
            vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=tie)), "model.embed_tokens.weight"
    src = tmp_path / "src"
    model.save_pretrained(str(src))
    sd = load_file(str(src / "model.safetensors"))
    if head == "same":
        sd[HEAD] = sd[embed].clone()
    elif head == "other":
        sd[HEAD] = sd[embed] + 0.05 * torch.randn_like(sd[embed])
    elif tie:
        sd.pop(HEAD, None)
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    return src


CASES = [  # family, tie_word_embeddings, stored head, method, compress the head
    ("llama", True, None, "rtn", True),
    ("llama", True, "same", "rtn", False),
    ("llama", True, "same", "rtn", True),
    ("llama", True, "same", "lplr", True),
    ("llama", True, "other", "rtn", False),
    ("llama", False, None, "lplr", True),
    ("llama", False, None, "rtn", False),
    ("gpt2", True, None, "rtn", True),
    ("gpt2", True, "same", "lplr", True),
]


@pytest.mark.parametrize("family,tie,head,method,include", CASES)
def test_every_loader_gives_the_same_model(tmp_path, family, tie, head, method, include):
    import lplr_convert  # noqa: F401  (registers the quantizer)
    from transformers import AutoModelForCausalLM

    from lplr_convert import load_model
    from lplr_convert.export.dense import decompress

    src = _family(tmp_path, family, tie, head)
    out = tmp_path / "out"
    extra = ["--include", "lm_head"] if include else []
    res = run_cli("--in-path", str(src), "--out-path", str(out), "--method", method, "--no-report", *extra)
    assert res.exit_code == 0, res.output
    methods = {t["name"]: t["method"] for t in json.loads((out / "lplr_manifest.json").read_text())["tensors"]}
    assert (methods.get(HEAD, "copy") != "copy") == (include and (head is not None or not tie))
    decompress(out, tmp_path / "dense")
    x = torch.arange(12)[None]
    with torch.no_grad():
        logits = {"load_model": load_model(out, factored=False)(x).logits,
                  "load_model factored": load_model(out)(x).logits,
                  "from_pretrained": AutoModelForCausalLM.from_pretrained(str(out)).eval()(x).logits,
                  "decompress": AutoModelForCausalLM.from_pretrained(str(tmp_path / "dense")).eval()(x).logits}
        original = AutoModelForCausalLM.from_pretrained(str(src)).eval()(x).logits
    ref = logits["from_pretrained"]
    for name, got in logits.items():
        assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), (name, float((got - ref).norm() / ref.norm()))
    if not include:  # only the layers were compressed: the head is the source's (tied or its own)
        err = float((ref - original).norm() / original.norm())
        assert err < 0.5, err
