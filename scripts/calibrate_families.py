#!/usr/bin/env python
"""calibrate on tiny random checkpoints of many transformers families, then convert --calibration (qlr, gptq, lsvd at
4.25 bits/param), eval and verify; the block-by-block statistics are compared with one full float64 forward pass of
the model transformers loads, with the same hooks (each block call one pass of its hooks).

A family whose calibrate is refused is converted without --calibration (its convert/eval/verify columns say so).
Usage: python scripts/calibrate_families.py [--out DIR] [FAMILY ...]   (default: every family below, ~7 min on 2 cores)
Writes DIR/results.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import inspect
import json
import string
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers as T

H = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
     "vocab_size": 128, "max_position_embeddings": 64}
KV = {"num_key_value_heads": 2}
ENC = {**H, "max_position_embeddings": 66}  # RoBERTa-style tables start after the padding index
FAMILIES = {
    "llama": (lambda: T.LlamaConfig(**H, **KV), "LlamaForCausalLM"),
    "qwen2": (lambda: T.Qwen2Config(**H, **KV), "Qwen2ForCausalLM"),
    "qwen3": (lambda: T.Qwen3Config(**H, **KV, head_dim=16), "Qwen3ForCausalLM"),
    "mistral": (lambda: T.MistralConfig(**H, **KV), "MistralForCausalLM"),
    "gemma": (lambda: T.GemmaConfig(**H, **KV, head_dim=16), "GemmaForCausalLM"),
    "gemma2": (lambda: T.Gemma2Config(**H, **KV, head_dim=16, sliding_window=8), "Gemma2ForCausalLM"),
    "gemma3": (lambda: T.Gemma3TextConfig(**{**H, "num_hidden_layers": 3}, **KV, head_dim=16, sliding_window=8,
                                          layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
               "Gemma3ForCausalLM"),
    "phi": (lambda: T.PhiConfig(**H), "PhiForCausalLM"),
    "phi3": (lambda: T.Phi3Config(**H, **KV, pad_token_id=0), "Phi3ForCausalLM"),
    "gpt2": (lambda: T.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=128), "GPT2LMHeadModel"),
    "gpt_neox": (lambda: T.GPTNeoXConfig(**H), "GPTNeoXForCausalLM"),
    "gptj": (lambda: T.GPTJConfig(n_embd=64, n_layer=2, n_head=4, n_positions=64, rotary_dim=8, vocab_size=128),
             "GPTJForCausalLM"),
    "opt": (lambda: T.OPTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                                vocab_size=128, max_position_embeddings=64, word_embed_proj_dim=64), "OPTForCausalLM"),
    "falcon": (lambda: T.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128),
               "FalconForCausalLM"),
    "bloom": (lambda: T.BloomConfig(hidden_size=64, n_layer=2, n_head=4, vocab_size=128), "BloomForCausalLM"),
    "stablelm": (lambda: T.StableLmConfig(**H, **KV), "StableLmForCausalLM"),
    "starcoder2": (lambda: T.Starcoder2Config(**H, **KV), "Starcoder2ForCausalLM"),
    "olmo2": (lambda: T.Olmo2Config(**H, **KV, pad_token_id=0), "Olmo2ForCausalLM"),
    "cohere": (lambda: T.CohereConfig(**H, **KV, pad_token_id=0), "CohereForCausalLM"),
    "bert": (lambda: T.BertConfig(**H), "BertModel"),
    "roberta": (lambda: T.RobertaConfig(**ENC), "RobertaModel"),
    "distilbert": (lambda: T.DistilBertConfig(dim=64, n_layers=2, n_heads=4, hidden_dim=128, vocab_size=128,
                                              max_position_embeddings=64), "DistilBertModel"),
    "xlm_roberta": (lambda: T.XLMRobertaConfig(**ENC), "XLMRobertaModel"),
    "electra": (lambda: T.ElectraConfig(**H, embedding_size=32), "ElectraModel"),
    "mpnet": (lambda: T.MPNetConfig(**ENC), "MPNetModel"),
    "deberta_v2": (lambda: T.DebertaV2Config(**H, relative_attention=True, pos_att_type=["p2c", "c2p"],
                                             position_buckets=16, max_relative_positions=64), "DebertaV2Model"),
    "albert": (lambda: T.AlbertConfig(**H, embedding_size=32), "AlbertModel"),
    "mixtral": (lambda: T.MixtralConfig(**H, **KV, num_local_experts=4, num_experts_per_tok=2), "MixtralForCausalLM"),
    "qwen2_moe": (lambda: T.Qwen2MoeConfig(**H, **KV, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                                           shared_expert_intermediate_size=64), "Qwen2MoeForCausalLM"),
}
SAMPLES, SEQ_LEN, BATCH = 8, 32, 4
EPS64 = torch.finfo(torch.float64).eps


def build(name: str, path: Path) -> None:
    """The tiny random checkpoint and a character-level WordPiece tokenizer (104 tokens)."""
    make, arch = FAMILIES[name]
    torch.manual_seed(sum(map(ord, name)))
    config = make()
    config.architectures = [arch]
    getattr(T, arch)(config).save_pretrained(str(path))
    chars = list(string.ascii_lowercase + string.digits + ".,;:!?'\"()-/+=*%$#@&[]{}<>_")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in string.ascii_lowercase +
                                                                      string.digits)]
    T.BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}).save_pretrained(str(path))


def full_forward(path: Path, stack_name: str) -> dict:
    """{weight name: (E[x x^T], tokens)} from one float64 forward of the model transformers loads."""
    from lplr_convert.calibration.capture import _is_causal
    from lplr_convert.calibration.moments import InputMoments
    from lplr_convert.calibration.text import load_tokenizer, make_batches, read_text, tokenize

    arch = json.loads((path / "config.json").read_text())["architectures"][0]
    model = getattr(T, arch).from_pretrained(str(path), dtype=torch.float64).eval()
    tok = load_tokenizer(path)
    seqs = tokenize(tok, read_text(None).lines, _is_causal(model.config), SAMPLES, SEQ_LEN)
    stack = model.get_submodule(stack_name)
    hooks, mask = [InputMoments(b, f"{stack_name}.{i}", torch.float64) for i, b in enumerate(stack)], {}
    for h, block in zip(hooks, stack):
        h.__enter__()
        block.register_forward_pre_hook(lambda module, args, h=h: h.start_batch(mask["now"]))
    kw = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    with torch.no_grad():
        for batch in make_batches(seqs, BATCH, tok.pad_token_id):
            mask["now"] = batch.attention_mask
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **kw)
    out = {}
    for h in hooks:
        h.__exit__()
        for m in h.moments.values():
            out.update({f"{member}.weight": (m.sum / m.tokens, m.tokens) for member in m.members})
    return out


def equal_to_full_forward(path: Path, stats_dir: Path) -> str:
    from lplr_convert.calibration import calibrate, load_calibration

    calibrate(path, stats_dir, samples=SAMPLES, seq_len=SEQ_LEN, batch_size=BATCH, accumulate_dtype=torch.float64,
              compute_dtype=torch.float64)
    stats = load_calibration(stats_dir)
    ref = full_forward(path, stats.manifest["block_stack"])
    if set(ref) != set(stats.weights):
        return f"FAIL: weights differ ({sorted(set(ref) ^ set(stats.weights))[:2]})"
    worst = 0.0
    for name, (H_ref, tokens) in ref.items():
        if stats.tokens(name) != tokens:
            return f"FAIL: {name} has {stats.tokens(name)} tokens, the full forward {tokens}"
        d = H_ref.diagonal().clamp_min(0).sqrt()
        tol = (tokens + 16 * 4 * 256) * EPS64 * torch.outer(d, d)  # float64 round-off (tests/calibration/test_run.py)
        worst = max(worst, float(((stats.statistic(name) - H_ref).abs() / tol.clamp_min(1e-300)).max()))
    return "pass" if worst <= 1 else f"FAIL: max |error| / round-off bound {worst:.3g}"


def _cli(*args: str) -> str:
    from click.testing import CliRunner

    from lplr_convert.cli import main

    res = CliRunner().invoke(main, list(args), catch_exceptions=False)
    if res.exit_code == 0:
        return "pass"
    lines = [ln for ln in (res.stderr or res.output).splitlines() if ln.startswith("error")]
    return "FAIL: " + (lines[-1] if lines else res.output[-200:])


def _step(row: dict, key: str, fn, *args) -> None:
    t0 = time.perf_counter()
    try:
        row[key] = fn(*args)
    except Exception as e:  # noqa: BLE001  (a crash is a result here)
        row[key] = f"CRASH {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    row[key + "_seconds"] = round(time.perf_counter() - t0, 1)


def run_family(name: str, root: Path) -> dict:
    d, row = root / name, {}
    src = d / "src"
    build(name, src)
    _step(row, "calibrate", _cli, "calibrate", "--in-path", str(src), "--out-path", str(d / "stats"), "--samples",
          str(SAMPLES), "--seq-len", str(SEQ_LEN), "--batch-size", str(BATCH))
    calibrated = row["calibrate"] == "pass"
    if calibrated:
        _step(row, "equal_full_forward", equal_to_full_forward, src, d / "stats64")
    row["calibrated_convert"] = calibrated
    calib = ["--calibration", str(d / "stats")] if calibrated else []
    for method, extra in (("qlr", []), ("gptq", []), ("lsvd", ["--target-bits-per-param", "4.25"])):
        out = d / f"out_{method}"
        _step(row, f"convert_{method}", _cli, "--in-path", str(src), "--out-path", str(out), "--method", method,
              *calib, "--no-report", *extra)
        _step(row, f"eval_{method}", _cli, "eval", "--original", str(src), "--converted", str(out), "--max-texts",
              "16", "--device", "cpu")
        _step(row, f"verify_{method}", _cli, "verify", "--in-path", str(out), "--source", str(src))
    return row


COLUMNS = ("calibrate", "equal_full_forward", "convert_qlr", "eval_qlr", "verify_qlr", "convert_gptq", "eval_gptq",
           "verify_gptq", "convert_lsvd", "eval_lsvd", "verify_lsvd")


def table(results: dict) -> str:
    def cell(row, c):
        v = row.get(c)
        if v is None:
            return "—"
        if v == "pass":
            return "pass" if row["calibrated_convert"] or not c.startswith(("convert", "eval", "verify")) else \
                "pass (uncalibrated)"
        return "refused" if "does not support" in v else v.split(":")[0]

    lines = ["| family | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(cell(row, c) for c in COLUMNS) + " |" for name, row in results.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("families", nargs="*", default=list(FAMILIES))
    args = parser.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="calibrate_families_"))
    results = {}
    for name in args.families:
        results[name] = run_family(name, root)
        print(name, {k: v for k, v in results[name].items() if not k.endswith("_seconds")}, file=sys.stderr, flush=True)
    (root / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
