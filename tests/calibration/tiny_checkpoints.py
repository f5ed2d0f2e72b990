"""Tiny checkpoints for the calibration tests (a uniquely named module: never collides with a conftest)."""

from __future__ import annotations

import string
from pathlib import Path

import torch

# name -> (config class, config kwargs, model class, module name of the block stack)
TINY = {
    "llama": ("LlamaConfig", {"hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "num_key_value_heads": 2}, "LlamaForCausalLM", "model.layers"),
    "bert": ("BertConfig", {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
                            "intermediate_size": 96}, "BertModel", "encoder.layer"),
    "gpt2": ("GPT2Config", {"n_embd": 48, "n_layer": 2, "n_head": 4, "n_positions": 64, "bos_token_id": 2,
                            "eos_token_id": 3}, "GPT2LMHeadModel", "transformer.h"),
    # sliding-window and full-attention layers get different masks and different rotary tables
    "gemma3": ("Gemma3TextConfig", {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
                                    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                                    "sliding_window": 8,
                                    "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
               "Gemma3ForCausalLM", "model.layers"),
    # the encoder reads its relative-position embeddings' weight directly (no module call); the position
    # projections' inputs are those embeddings, not tokens
    "deberta_v2": ("DebertaV2Config", {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
                                       "intermediate_size": 96, "relative_attention": True,
                                       "pos_att_type": ["p2c", "c2p"], "position_buckets": 16},
                   "DebertaV2Model", "encoder.layer"),
    # parallel attention and MLP: the fused qkv and the MLP's first linear read one input
    "falcon": ("FalconConfig", {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4},
               "FalconForCausalLM", "transformer.h"),
    # one layer group shared by every layer: the forward runs block 0 num_hidden_layers times
    "albert": ("AlbertConfig", {"hidden_size": 48, "num_hidden_layers": 3, "num_attention_heads": 4,
                                "intermediate_size": 96, "embedding_size": 32},
               "AlbertModel", "encoder.albert_layer_groups"),
    # two layer groups of two layers each: the schedule calls block 0 twice, then block 1 twice
    "albert_groups": ("AlbertConfig", {"hidden_size": 48, "num_hidden_layers": 4, "num_hidden_groups": 2,
                                       "num_attention_heads": 4, "intermediate_size": 96, "embedding_size": 32},
                      "AlbertModel", "encoder.albert_layer_groups"),
}
ONCE = [name for name in TINY if not name.startswith("albert")]  # families whose forward runs each block once
VOCAB = 128


def char_tokenizer(path: Path) -> None:
    """A WordPiece tokenizer over single characters (104 tokens), saved to `path`."""
    from transformers import BertTokenizer

    chars = list(string.ascii_lowercase + string.digits + ".,;:!?'\"()-/+=*%$#@&[]{}<>_")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in string.ascii_lowercase +
                                                                      string.digits)]
    BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}).save_pretrained(str(path))


def build_tiny(name: str, path: Path) -> Path:
    import transformers

    cfg_name, kwargs, cls_name, _ = TINY[name]
    torch.manual_seed(sum(map(ord, name)))
    config = getattr(transformers, cfg_name)(vocab_size=VOCAB, max_position_embeddings=64, **kwargs)
    config.architectures = [cls_name]
    model = getattr(transformers, cls_name)(config)
    if name == "llama":  # bf16 in several shards: the reader's sharded path and a dtype cast
        model.to(torch.bfloat16).save_pretrained(str(path), max_shard_size="60KB")
    else:
        model.save_pretrained(str(path))
    char_tokenizer(path)
    return path


def build_with_positions(path: Path, family: str, positions: int) -> Path:
    """A tiny random checkpoint of `family` with only `positions` positions and a character tokenizer that sets no
    length limit of its own (so the model's table is the only bound)."""
    import transformers

    torch.manual_seed(0)
    if family == "roberta":
        config = transformers.RobertaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                            intermediate_size=64, max_position_embeddings=positions, pad_token_id=0)
        model = transformers.RobertaModel(config)
    else:
        config = transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=1, n_head=2, n_positions=positions,
                                         bos_token_id=2, eos_token_id=3)
        model = transformers.GPT2LMHeadModel(config)
    model.save_pretrained(str(path))
    char_tokenizer(path)
    return path
