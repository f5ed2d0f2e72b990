"""The skeleton and the stand-in pass: computed buffers kept, only pre-block modules loaded, per-block arguments."""

from __future__ import annotations

import torch

from lplr_convert.calibration.capture import build_skeleton, record_calls, release_outside
from lplr_convert.calibration.text import make_batches
from lplr_convert.io.reader import open_source


def _batch():
    ids = torch.arange(4, 34).reshape(2, 15)
    return make_batches([ids[0].tolist(), ids[1, :11].tolist()], 2, 0)[0]


def test_each_block_gets_the_arguments_the_forward_gives_it(tiny_dir):
    """Gemma3 with layer_types sliding/full/sliding: blocks 0 and 2 get the sliding mask and local rotary table,
    block 1 the full-attention ones, as the model's own loop chooses them."""
    sk = build_skeleton(open_source(str(tiny_dir("gemma3"))), "cpu", torch.float32)
    _, first = record_calls(sk, _batch())
    assert len(first) == 1  # without an output form the forward stops at block 0
    hidden, calls = record_calls(sk, _batch(), form=lambda h: h)
    assert hidden.shape == (2, 15, 64) and len(calls) == 3
    masks = [c.kwargs["attention_mask"] for c in calls]
    cos = [c.kwargs["position_embeddings"][0] for c in calls]
    assert masks[0] is masks[2] and not torch.equal(masks[0], masks[1])
    assert cos[0] is cos[2] and not torch.allclose(cos[0], cos[1])
    assert all(c.kwargs.get("use_cache", False) is False for c in calls)


def test_skeleton_loads_only_what_runs_before_the_first_block(tiny_dir):
    from transformers import LlamaForCausalLM

    path = tiny_dir("llama")
    sk = build_skeleton(open_source(str(path)), "cpu", torch.float32)
    dense = LlamaForCausalLM.from_pretrained(str(path))
    # computed buffers survive the meta-device skeleton
    assert torch.equal(sk.model.model.rotary_emb.inv_freq, dense.model.rotary_emb.inv_freq)
    assert all(p.is_meta for p in sk.model.parameters())
    hidden, _ = record_calls(sk, _batch())
    emb = sk.model.model.embed_tokens.weight
    assert not emb.is_meta and emb.dtype == torch.float32
    assert torch.equal(emb, dense.model.embed_tokens.weight.float())
    assert torch.equal(hidden, emb[_batch().input_ids])
    assert sk.model.lm_head.weight.is_meta and sk.model.model.norm.weight.is_meta
    assert all(p.is_meta for p in sk.blocks.parameters())
    release_outside(sk)
    assert sk.model.model.embed_tokens.weight.is_meta
