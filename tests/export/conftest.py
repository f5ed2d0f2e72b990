"""Export fixtures: conversions of tiny float32 models (and MiniLM) exported once per session, then loaded together in
one fresh interpreter that never imports lplr_convert (`load_exports.py`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from export_testing import convert_to

LLAMA_IDS = [[1, 5, 17, 33, 2, 60, 71, 8, 90, 44]]
BERT_IDS = [[101, 7592, 2088, 2003, 1037, 3231, 1997, 1996, 4118, 102]]

# Recipe of the mixed case: two packed schemes (8-bit channel for attention, 4-bit groups of 32 for the MLP) and
# three kinds of weight compressed-tensors cannot hold (lsvd factors, a group size not dividing 96 inputs, minmax).
MIXED_RECIPE = """
rules:
  - {pattern: 'layers\\.1\\.self_attn\\.v_proj', method: rtn, b0: 4, quantizer: channel, scheme: minmax}
  - {pattern: 'self_attn\\.o_proj', method: lsvd, rank: 8}
  - {pattern: 'mlp\\.down_proj', method: rtn, b0: 4, quantizer: group, group_size: 64, scheme: symmetric}
  - {pattern: 'self_attn', method: rtn, b0: 8, quantizer: channel, scheme: symmetric}
  - {pattern: 'mlp', method: gptq, b0: 4, quantizer: group, group_size: 32, scheme: symmetric}
"""


@dataclass
class Case:
    dst: Path  # the conversion
    ct: Path | None  # its compressed-tensors export
    peft: Path | None  # its peft export
    auto: str  # the transformers class that loads it
    ids: list
    dequantize: bool  # loaded with CompressedTensorsConfig(dequantize=True)
    loaded: dict | None = None  # what load_exports.py saved


def _tiny(tmp_path_factory, name: str, arch: str, config) -> Path:
    import transformers

    torch.manual_seed(4)
    path = tmp_path_factory.mktemp(name)
    getattr(transformers, arch)(config).save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def mixtral_dir(tmp_path_factory) -> Path:
    """Tiny float32 Mixtral: per-expert 2-D weights in the checkpoint, fused into 3-D parameters on load."""
    from transformers import MixtralConfig

    return _tiny(tmp_path_factory, "mixtral", "MixtralForCausalLM", MixtralConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, num_local_experts=4, num_experts_per_tok=2))


@pytest.fixture(scope="session")
def falcon_dir(tmp_path_factory) -> Path:
    """Tiny float32 Falcon (FalconLinear, whose weight init reads `weight`)."""
    from transformers import FalconConfig

    return _tiny(tmp_path_factory, "falcon", "FalconForCausalLM", FalconConfig(
        vocab_size=96, hidden_size=64, num_hidden_layers=1, num_attention_heads=4))


@pytest.fixture(scope="session")
def llama32_dir(tmp_path_factory) -> Path:
    """Tiny float32 Llama: hidden 64, MLP 96 (groups of 32 divide every input width, groups of 64 not the MLP's)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("llama32")
    LlamaForCausalLM(cfg).save_pretrained(str(path))
    return path


def _case(root: Path, name: str, src: Path, formats: tuple[str, ...], auto: str, ids: list, dequantize: bool,
          **conv) -> Case:
    from lplr_convert.export import export

    dst = convert_to(src, root / name, **conv)
    outs = {f: export(dst, root / f"{name}-{f}", f).out for f in formats}
    return Case(dst, outs.get("compressed-tensors"), outs.get("peft"), auto, ids, dequantize)


def _build_cases(root: Path, llama: Path, minilm: Path, gpt2: Path, mixtral: Path, falcon: Path) -> dict[str, Case]:
    ct, both, lm = ("compressed-tensors",), ("compressed-tensors", "peft"), "AutoModelForCausalLM"
    g32 = {"quantizer": "group", "group_size": 32}
    sym32 = {"method": "gptq", "b0": 4, "scheme": "symmetric", **g32}
    return {
        # per-expert weights transformers fuses on load: packed, decoded by its experts path (float16 scales)
        "gptq_mixtral": _case(root, "gptq_mixtral", mixtral, ct, lm, LLAMA_IDS, False, **sym32),
        # FalconLinear's weight init reads `weight`: loads with dequantize=True, as the export's note says
        "gptq_falcon": _case(root, "gptq_falcon", falcon, ct, lm, LLAMA_IDS, True, **sym32),
        "rtn4_group": _case(root, "rtn4_group", llama, ct, lm, LLAMA_IDS, False, method="rtn", b0=4,
                            scheme="symmetric", scale_dtype="float16", **g32),
        "gptq4_channel_asym": _case(root, "gptq4_channel_asym", llama, ct, lm, LLAMA_IDS, True, method="gptq", b0=4,
                                    quantizer="channel", scheme="asymmetric"),
        "rtn4_tensor_asym": _case(root, "rtn4_tensor_asym", llama, ct, lm, LLAMA_IDS, False, method="rtn", b0=4,
                                  quantizer="tensor", scheme="asymmetric"),  # int8 zero point: default path loads it
        "rtn8_channel": _case(root, "rtn8_channel", llama, ct, lm, LLAMA_IDS, False, method="rtn", b0=8,
                              quantizer="channel", scheme="symmetric", scale_dtype="float32"),
        "mixed": _case(root, "mixed", llama, ct, lm, LLAMA_IDS, False, recipe=MIXED_RECIPE),
        "qlr_llama": _case(root, "qlr_llama", llama, both, lm, LLAMA_IDS, True, method="qlr", b0=4, rank=8, iters=1,
                           **g32),
        "qlr_minilm": _case(root, "qlr_minilm", minilm, both, "AutoModel", BERT_IDS, True, method="qlr", b0=4,
                            rank=8, iters=1, scheme="symmetric", clip=None, layers="0", types="attn"),
        "qlr_gpt2": _case(root, "qlr_gpt2", gpt2, both, lm, LLAMA_IDS, False, method="qlr", b0=4, rank=6, iters=1,
                          quantizer="channel", clip=None),
    }


def _jobs(cases: dict[str, Case], root: Path) -> list[dict]:
    jobs = []
    for name, c in cases.items():
        jobs.append({"name": name, "base": str(c.ct), "adapter": None if c.peft is None else str(c.peft),
                     "auto": c.auto, "dequantize": c.dequantize, "input_ids": c.ids, "result": str(root / name)})
    # the other path for three of them: MiniLM's base alone through transformers' default (compressed) path
    # (symmetric weights need no dequantize), the mixed recipe and Mixtral's experts with dequantize=True
    for name, new, dequantize in (("qlr_minilm", "qlr_minilm_base", False), ("mixed", "mixed_dequantize", True),
                                  ("gptq_mixtral", "gptq_mixtral_dequantize", True)):
        c = cases[name]
        jobs.append({"name": new, "base": str(c.ct), "adapter": None, "auto": c.auto, "dequantize": dequantize,
                     "input_ids": c.ids, "result": str(root / new)})
    return jobs


@pytest.fixture(scope="session")
def exports(tmp_path_factory, llama32_dir, minilm_dir, tiny_gpt2_dir, mixtral_dir, falcon_dir) -> dict:
    """{case: Case} with `loaded` filled by one fresh interpreter, plus "lplr_modules": what that interpreter
    imported of lplr_convert (the base-only load of MiniLM is case "qlr_minilm_base")."""
    root = tmp_path_factory.mktemp("exports")
    cases = _build_cases(root, llama32_dir, minilm_dir, tiny_gpt2_dir, mixtral_dir, falcon_dir)
    jobs = _jobs(cases, root / "loaded")
    (root / "loaded").mkdir()
    (root / "jobs.json").write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # not even the worktree on the path
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    script = Path(__file__).with_name("load_exports.py")
    proc = subprocess.run([sys.executable, str(script), str(root / "jobs.json")], capture_output=True, text=True,
                          env=env, cwd=str(root), timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cases["qlr_minilm_base"] = Case(**{**cases["qlr_minilm"].__dict__, "peft": None, "dequantize": False})
    cases["mixed_dequantize"] = Case(**{**cases["mixed"].__dict__, "dequantize": True})
    cases["gptq_mixtral_dequantize"] = Case(**{**cases["gptq_mixtral"].__dict__, "dequantize": True})
    for job in jobs:
        cases[job["name"]].loaded = torch.load(job["result"], weights_only=True)
    return {"cases": cases, "lplr_modules": json.loads(proc.stdout.strip().splitlines()[-1])["lplr_modules"]}
