"""calibrate(): block-by-block statistics equal a full forward pass of the normally loaded model."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_checkpoints import ONCE, TINY

from lplr_convert import constants as C
from lplr_convert.calibration import calibrate, load_calibration
from lplr_convert.calibration import run as run_module
from lplr_convert.calibration.capture import _is_causal
from lplr_convert.calibration.moments import InputMoments
from lplr_convert.calibration.text import load_tokenizer, make_batches, read_text, tokenize

EPS64 = torch.finfo(torch.float64).eps
SAMPLES, SEQ = 6, 40


def reference(path, text, samples=SAMPLES, seq_len=SEQ, batch_size=4) -> dict[str, tuple[torch.Tensor, int]]:
    """{weight name: (E[x x^T], tokens)} from one forward of the whole model loaded by from_pretrained in float64,
    on the same batches, with the same hooks on every block."""
    import transformers

    name = max((n for n in TINY if path.name.startswith(f"calib_{n}")), key=len)  # albert_groups, not albert
    model = getattr(transformers, TINY[name][2]).from_pretrained(str(path), dtype=torch.float64).eval()
    tok = load_tokenizer(path)
    seqs = tokenize(tok, read_text(text).lines, _is_causal(model.config), samples, seq_len)
    stack = model.get_submodule(TINY[name][3])
    hooks = [InputMoments(b, f"{TINY[name][3]}.{i}", torch.float64) for i, b in enumerate(stack)]
    mask = {}
    for h, block in zip(hooks, stack):
        h.__enter__()  # each call of a block is one pass of its hooks (ALBERT runs its one block several times)
        block.register_forward_pre_hook(lambda module, args, h=h: h.start_batch(mask["now"]))
    with torch.no_grad():
        for batch in make_batches(seqs, batch_size, tok.pad_token_id):
            mask["now"] = batch.attention_mask
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    out = {}
    for h in hooks:
        h.__exit__()
        for m in h.moments.values():
            out.update({f"{member}.weight": (m.sum / m.tokens, m.tokens) for member in m.members})
    return out


def tolerance(H: torch.Tensor, tokens: int, depth: int, width: int) -> torch.Tensor:
    """Float64 round-off bound, entrywise. Both runs do the same float64 operations, possibly in another order
    (other batch shapes). Each H_ij is a mean of `tokens` products, whose summation error is at most
    tokens * eps * mean|x_i x_j|; each input x carries the forward's relative round-off, at most a few eps per
    length-`width` inner product per matmul, over `depth` blocks of a few matmuls each (16 * depth * width eps).
    mean|x_i x_j| <= sqrt(H_ii H_jj) (Cauchy-Schwarz) gives the scale."""
    d = H.diagonal().clamp_min(0).sqrt()
    return (tokens + 16 * depth * width) * EPS64 * torch.outer(d, d)


def assert_matches(stats, ref: dict, depth: int, width: int) -> None:
    assert set(stats.weights) == set(ref)
    for name, (H_ref, tokens) in ref.items():
        H = stats.statistic(name)
        assert stats.tokens(name) == tokens, name
        assert ((H - H_ref).abs() <= tolerance(H_ref, tokens, depth, width)).all(), name


def _calibrate(path, out, text, **kw):
    kw = {"samples": SAMPLES, "seq_len": SEQ, "batch_size": 4, "accumulate_dtype": torch.float64,
          "compute_dtype": torch.float64, **kw}
    return calibrate(path, out, text=text, **kw)


@pytest.mark.parametrize("name", ONCE)
def test_block_by_block_equals_full_forward(name, tiny_dir, text_file, tmp_path):
    path = tiny_dir(name)
    manifest = _calibrate(path, tmp_path / "stats", text_file)
    stats = load_calibration(tmp_path / "stats")
    assert manifest == stats.manifest == json.loads((tmp_path / "stats" / C.CALIB_MANIFEST).read_text())
    assert manifest["blocks"] == TINY[name][1].get("num_hidden_layers", TINY[name][1].get("n_layer"))
    assert_matches(stats, reference(path, text_file), manifest["blocks"], 160)


def test_per_layer_kwargs_are_needed(tiny_dir, text_file, tmp_path, monkeypatch):
    """Giving every block block 0's arguments (sliding-window mask and local rotary table) breaks the equality, so
    the test above checks that each block gets its own."""
    real = run_module._capture

    def first_blocks_call(sk, batches):
        hidden, calls = real(sk, batches)
        return hidden, [[c[0]] * len(c) for c in calls]

    monkeypatch.setattr(run_module, "_capture", first_blocks_call)
    _calibrate(tiny_dir("gemma3"), tmp_path / "stats", text_file)
    with pytest.raises(AssertionError):
        assert_matches(load_calibration(tmp_path / "stats"), reference(tiny_dir("gemma3"), text_file), 3, 160)


def test_qkv_and_gate_up_share_one_statistic(tiny_dir, text_file, tmp_path):
    m = _calibrate(tiny_dir("llama"), tmp_path / "stats", text_file)
    w = m[C.S_WEIGHTS]
    for i in range(2):
        attn, mlp = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        assert len({w[f"{attn}{p}_proj.weight"]["statistic"] for p in "qkv"}) == 1
        assert w[f"{mlp}gate_proj.weight"]["statistic"] == w[f"{mlp}up_proj.weight"]["statistic"]
        assert w[f"{attn}o_proj.weight"]["statistic"] != w[f"{attn}q_proj.weight"]["statistic"]
        assert w[f"{mlp}down_proj.weight"]["shape"] == [160, 160]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "stats" / "lplr_stats-00000.safetensors"), "pt") as f:
        assert len(list(f.keys())) == 4  # qkv, o, gate/up, down: each stored once


def test_conv1d_statistic_is_over_the_input(tiny_dir, text_file, tmp_path):
    m = _calibrate(tiny_dir("gpt2"), tmp_path / "stats", text_file)
    w = m[C.S_WEIGHTS]
    assert w["transformer.h.0.attn.c_attn.weight"]["shape"] == [48, 48]  # weight is 48 x 144 (in x out)
    assert w["transformer.h.0.mlp.c_proj.weight"]["shape"] == [192, 192]  # weight is 192 x 48


def test_a_block_run_several_times_accumulates_all_its_inputs(tiny_dir, text_file, tmp_path):
    """ALBERT's one layer group runs num_hidden_layers (3) times: block by block it runs 3 times too, and each shared
    weight's statistic is E[x x^T] over the inputs of all 3 calls, as a full forward with the same hooks gives it.
    The weights compressed with that statistic carry an output error (convert --calibration accepts them)."""
    from lplr_convert.pipeline.convert import ConvertOptions, convert

    path = tiny_dir("albert")
    manifest = _calibrate(path, tmp_path / "stats", text_file)
    stats = load_calibration(tmp_path / "stats")
    assert manifest["blocks"] == 1 and len(manifest[C.S_WEIGHTS]) == 6
    q = "encoder.albert_layer_groups.0.albert_layers.0.attention.query.weight"
    assert stats.tokens(q) == 3 * manifest["tokens"]  # every token, once per call
    assert_matches(stats, reference(path, text_file), 3, 160)
    doc = convert(ConvertOptions(str(path), str(tmp_path / "out"), layer={"method": "gptq"},
                                 calibration=str(tmp_path / "stats"), write_report=False))
    comp = [r for r in doc["tensors"] if r["method"] != "copy"]
    assert {r["name"] for r in comp} == set(manifest[C.S_WEIGHTS])
    assert all(r["output_rel_error"] is not None and r["layer"] == 0 for r in comp)


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_padding_is_excluded(name, tiny_dir, text_file, tmp_path):
    """Batches of 4 right-padded sequences give the statistics of one-sequence batches (no padding at all). The
    text is short enough that the causal LM's last chunk is shorter than seq_len."""
    path, text = tiny_dir(name), tmp_path / "short.txt"
    text.write_text("\n".join(read_text(text_file).lines[:10]), encoding="utf-8")
    tok = load_tokenizer(path)
    seqs = tokenize(tok, read_text(text).lines, name == "llama", 100, SEQ)
    padded = make_batches(seqs, 4, tok.pad_token_id)
    assert any(b.tokens < b.attention_mask.numel() for b in padded)  # the test really pads
    _calibrate(path, tmp_path / "padded", text, samples=100, batch_size=4)
    m = _calibrate(path, tmp_path / "single", text, samples=100, batch_size=1)
    assert m["tokens"] == sum(len(s) for s in seqs) and m["samples"] == len(seqs)
    ref = {n: (load_calibration(tmp_path / "single").statistic(n), m["tokens"]) for n in m[C.S_WEIGHTS]}
    assert_matches(load_calibration(tmp_path / "padded"), ref, m["blocks"], 160)


def test_seq_len_is_bounded_by_the_position_table(text_file, tmp_path):
    """A RoBERTa-style table of 24 positions whose ids start after the padding index (0) embeds 23 tokens: a longer
    --seq-len is cut to that (with a warning), and every statistic comes from sequences of at most 23 tokens."""
    from tiny_checkpoints import build_with_positions

    src = build_with_positions(tmp_path / "roberta", "roberta", 24)
    manifest = _calibrate(src, tmp_path / "stats", text_file, seq_len=64)
    assert manifest["seq_len"] == 23
    assert 0 < manifest["tokens"] <= 23 * manifest["samples"]


def _tiny_other(path, kind: str):
    import transformers

    torch.manual_seed(0)
    if kind == "t5":
        model = transformers.T5ForConditionalGeneration(transformers.T5Config(
            vocab_size=128, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, decoder_start_token_id=0))
    elif kind == "mixtral":  # saved with per-expert 2-D weights, fused into 3-D experts on load
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
            vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, num_local_experts=2, num_experts_per_tok=1))
    elif kind == "deberta_conv":  # a convolution between blocks 0 and 1 changes the hidden states
        model = transformers.DebertaV2Model(transformers.DebertaV2Config(
            vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=64, conv_kernel_size=3))
    else:
        model = transformers.ViTModel(transformers.ViTConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                             num_attention_heads=2, image_size=16, patch_size=8))
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(str(path))
    if kind == "deberta_conv":
        from tiny_checkpoints import char_tokenizer

        char_tokenizer(path)
    return path


@pytest.mark.parametrize(("kind", "needles"), [
    ("t5", ("several block stacks", "encoder.block", "decoder.block")),
    ("vit", ("ViTModel takes pixel_values", "--calibration")),
    ("mixtral", ("does not support MixtralForCausalLM", "renames or fuses", "mlp.gate.weight", "--calibration")),
    ("deberta_conv", ("did not reach block 1 of encoder.layer", "calls encoder.conv.conv after block 0")),
])
def test_models_calibrate_cannot_run_are_one_line_errors(kind, needles, tmp_path):
    """An encoder-decoder (two block stacks), a vision model (no token ids), an MoE whose checkpoint weights
    transformers fuses on load, and a model that transforms the hidden states between blocks are refused by name;
    nothing written."""
    from lplr_testing import error_line, run_cli

    src = _tiny_other(tmp_path / kind, kind)
    error_line(run_cli("calibrate", "--in-path", str(src), "--out-path", str(tmp_path / "stats")), *needles)
    assert not (tmp_path / "stats").exists()
