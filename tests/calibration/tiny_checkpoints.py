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
}
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
