"""Model-level fidelity on the real all-MiniLM-L6-v2 and on a tiny causal LM built here: exact properties."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from lplr_convert import constants as C
from lplr_convert import evaluate as ev
from lplr_convert.errors import LplrError
from lplr_convert.verify import verify
from lplr_convert.evaluate import compare_embeddings, evaluate, evaluate_state_dict, load_texts, model_kind
from lplr_convert.io.manifest import read_manifest

TEXTS = load_texts(max_texts=24)[0]


def _perturbed(sd: dict[str, torch.Tensor], scale: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """Gaussian noise of `scale` times each 2-D block weight's std; everything else unchanged."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * v.float().std() * torch.randn(v.shape, generator=g) if v.ndim == 2 and "layer" in k else v
            for k, v in sd.items()}


@pytest.fixture(scope="module")
def minilm_sd(minilm_dir):
    return load_file(str(minilm_dir / C.SAFE_SINGLE))


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory, minilm_dir):
    """A tiny random Llama (hidden 32, 2 layers, fp32, seed 0) that uses MiniLM's BERT tokenizer for its token ids."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(minilm_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("tiny_lm")
    LlamaForCausalLM(cfg).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


# ---------------------------------------------------------------------------------------------------- pure parts


def test_compare_embeddings_properties():
    a = torch.randn(20, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    same = compare_embeddings(a, a.clone())
    assert same == {"cosine_mean": pytest.approx(1.0, abs=1e-12), "cosine_min": pytest.approx(1.0, abs=1e-12),
                    "neighbour_kept": 1.0}
    assert compare_embeddings(a, 3.0 * a)["cosine_min"] == pytest.approx(1.0, abs=1e-12)  # scale does not matter
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    rotated = compare_embeddings(a, a @ q)  # every pairwise cosine kept, each vector moved
    assert rotated["neighbour_kept"] == 1.0 and rotated["cosine_mean"] < 0.9
    flipped = compare_embeddings(a, -a)
    assert flipped["cosine_mean"] == pytest.approx(-1.0) and flipped["neighbour_kept"] == 1.0
    shuffled = compare_embeddings(a, a[torch.arange(19, -1, -1)])
    assert shuffled["neighbour_kept"] < 0.5 and shuffled["cosine_min"] < shuffled["cosine_mean"] < 1
    with pytest.raises(ValueError):
        compare_embeddings(a, a[:, :8])


def test_load_texts(tmp_path):
    texts, source = load_texts()
    assert 60 <= len(texts) <= 100 and len(set(texts)) == len(texts) and "packaged" in source
    assert all(t == t.strip() and len(t.split()) >= 4 for t in texts)
    assert load_texts(max_texts=5)[0] == texts[:5]
    f = tmp_path / "t.txt"
    f.write_text("first line\n\n  second line  \nthird\n", encoding="utf-8")
    assert load_texts(f) == (["first line", "second line", "third"], str(f.resolve()))
    assert load_texts(["a b", "c d"])[0] == ["a b", "c d"]
    for bad in (tmp_path / "missing.txt", tmp_path / "one.txt"):
        if bad.name == "one.txt":
            bad.write_text("only one\n")
        with pytest.raises(LplrError):
            load_texts(bad)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\nx y\n".encode("latin-1"))
    with pytest.raises(LplrError, match="UTF-8"):
        load_texts(tmp_path / "latin1.txt")


def test_model_kind(minilm_dir, tiny_lm_dir, tiny_gpt2_dir, tmp_path):
    assert model_kind(minilm_dir) == ev.KIND_ENCODER
    assert model_kind(tiny_lm_dir) == ev.KIND_CAUSAL
    assert model_kind(tiny_gpt2_dir) == ev.KIND_CAUSAL  # GPT2LMHeadModel
    with pytest.raises(LplrError, match="config.json"):
        model_kind(tmp_path)


# ---------------------------------------------------------------------------------------------------- encoders


def test_encoder_identical_and_perturbed(minilm_dir, minilm_sd):
    same = evaluate_state_dict(minilm_dir, minilm_sd, TEXTS)
    assert same["kind"] == "encoder" and same["texts"] == len(TEXTS)
    assert same["cosine_mean"] == pytest.approx(1.0, abs=1e-9) and same["cosine_min"] == pytest.approx(1.0, abs=1e-9)
    assert same["neighbour_kept"] == 1.0
    assert same["tensors_loaded"] == len(minilm_sd) - 1  # position_ids is not a parameter of the model
    prefixed = {f"bert.{k}": v for k, v in _perturbed(minilm_sd, 0.3).items()}  # names of a BertFor* checkpoint
    worse = evaluate_state_dict(minilm_dir, prefixed, TEXTS)
    assert worse["tensors_loaded"] == same["tensors_loaded"]
    assert 0.3 < worse["cosine_min"] <= worse["cosine_mean"] < 0.9999
    assert worse["neighbour_kept"] <= 1.0


def test_overwrite_weights_maps_names_and_refuses_misfits():
    from transformers import BertConfig, BertModel

    torch.manual_seed(3)
    model = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32, max_position_embeddings=16))
    name = "encoder.layer.0.attention.self.query.weight"
    new = torch.randn(16, 16, dtype=torch.float64)
    assert ev._overwrite_weights(model, [(f"bert.{name}", new), ("bert.embeddings.position_ids", torch.arange(16))],
                                 None) == 1
    assert torch.equal(model.state_dict()[name], new.float())  # cast to the model's dtype, in place
    with pytest.raises(LplrError, match="shape"):
        ev._overwrite_weights(model, [(name, torch.zeros(16, 15))], None)
    with pytest.raises(LplrError, match="no place"):
        ev._overwrite_weights(model, [("cls.predictions.decoder.weight", torch.zeros(50, 16))], None)
    # Only the required names must land (the converter's compressed tensors).
    assert ev._overwrite_weights(model, [("cls.predictions.decoder.weight", torch.zeros(50, 16)), (name, new)],
                                 {name}) == 1
    with pytest.raises(LplrError, match="no place"):
        ev._overwrite_weights(model, [("lm_head.weight", torch.zeros(50, 16))], {"lm_head.weight"})


def test_plain_encoder_mean_pooling_matches_sentence_transformers(minilm_dir, tmp_path):
    plain = tmp_path / "plain"  # the same BERT without modules.json: AutoModel + mean pooling
    plain.mkdir()
    for f in minilm_dir.iterdir():
        if f.is_file() and f.name != "modules.json":
            shutil.copy(f, plain / f.name)
    a = ev._Encoder(plain, "cpu").embed(TEXTS)
    b = ev._Encoder(minilm_dir, "cpu").embed(TEXTS)
    assert compare_embeddings(a, b)["cosine_min"] > 1 - 1e-6


# ---------------------------------------------------------------------------------------------------- causal LMs


def test_causal_identical_and_perturbed(tiny_lm_dir, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sd = load_file(str(tiny_lm_dir / C.SAFE_SINGLE))
    same = evaluate_state_dict(tiny_lm_dir, sd, TEXTS)
    assert same["kind"] == "causal_lm"
    assert same["kl_mean"] == 0.0 and same["top1_agreement"] == 1.0
    assert same["perplexity_converted"] == same["perplexity_original"]
    # Perplexity against the model's own loss, one unpadded text at a time.
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    nll, n = 0.0, 0
    with torch.no_grad():
        for t in TEXTS:
            ids = tok(t, return_tensors="pt")["input_ids"]
            nll += float(model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
            n += ids.shape[1] - 1
    assert same["tokens"] == n
    assert same["perplexity_original"] == pytest.approx(math.exp(nll / n), rel=1e-5)

    noisy = _perturbed(sd, 0.5)
    worse = evaluate_state_dict(tiny_lm_dir, noisy, TEXTS)
    assert worse["kl_mean"] > 1e-4 and worse["top1_agreement"] < 1.0
    assert worse["perplexity_original"] == same["perplexity_original"]
    assert worse["perplexity_converted"] != worse["perplexity_original"]
    monkeypatch.setattr(ev, "_SPILL_BYTES", 0)  # every batch of original log-probs goes through a temp file
    spilled = evaluate_state_dict(tiny_lm_dir, noisy, TEXTS)
    for key in ("kl_mean", "top1_agreement", "perplexity_original", "perplexity_converted", "tokens"):
        assert spilled[key] == worse[key]


# ---------------------------------------------------------------------------------------------------- end to end


def test_evaluate_writes_the_manifest_and_report(converted, minilm_dir, tiny_lm_dir, tmp_path):
    results = {}
    for method in ("lplr", "rtn"):  # the CLI defaults: lplr rank fraction 0.8 with 8/8 bits; rtn 8 bits
        out = tmp_path / method
        shutil.copytree(converted(method), out)  # the session's shared conversions stay untouched
        opts = read_manifest(out)[C.M_OPTIONS]["settings"]
        if method == "lplr":  # each method's own knobs are recorded with their defaults
            assert (opts["rank"], opts["b1"], opts["b2"]) == ({"kind": "rank_fraction", "value": 0.8}, 8, 8)
        else:
            assert opts["b0"] == 8 and "b1" not in opts
        before = json.loads((out / C.MANIFEST_FILE).read_text())
        results[method] = res = evaluate(minilm_dir, out, max_texts=20)
        assert 0 < res["cosine_min"] <= res["cosine_mean"] <= 1 and res["texts"] == 20
        after = read_manifest(out)  # still complete and intact
        assert after.pop(C.M_EVAL) == res
        before.pop(C.M_EVAL)
        verify(out)  # the digests were resealed and the re-rendered report's files listed: nothing else changed
        assert set(after.pop(C.M_REPORT)) >= {C.REPORT_MD, C.REPORT_JSON}
        for doc in (after, before):
            doc.pop(C.M_DIGESTS), doc.pop(C.M_REPORT, None)
        assert after == before
        md = (out / C.REPORT_MD).read_text()
        assert "## Fidelity" in md and f"{res['cosine_mean']:.4f}" in md
    assert results["rtn"]["cosine_mean"] > 0.999 > results["lplr"]["cosine_mean"]  # the honest baseline
    assert results["rtn"]["neighbour_kept"] >= results["lplr"]["neighbour_kept"]
    with pytest.raises(LplrError, match="llama"):
        evaluate(tiny_lm_dir, tmp_path / "rtn")
    with pytest.raises(LplrError, match="not a local directory"):
        evaluate(tmp_path / "nowhere", tmp_path / "rtn")


def test_evaluate_causal_end_to_end(tiny_lm_dir, tmp_path):
    from lplr_convert.pipeline.convert import ConvertOptions, convert

    out = tmp_path / "rtn4"
    convert(ConvertOptions(in_path=str(tiny_lm_dir), out_path=str(out), layer={"method": "rtn", "b0": 4}))
    res = evaluate(tiny_lm_dir, out, text=TEXTS[:12])
    assert res["kind"] == "causal_lm" and res["text_source"] == "list"
    assert 0 < res["kl_mean"] < 0.5 and 0 < res["top1_agreement"] <= 1
    assert read_manifest(out)[C.M_EVAL]["kl_mean"] == res["kl_mean"]
    assert "KL(original ‖ converted)" in (out / C.REPORT_MD).read_text()


def test_evaluate_an_moe_whose_expert_weights_transformers_fuses(minilm_dir, tmp_path):
    """Mixtral checkpoints keep per-expert 2-D weights (block_sparse_moe.experts.N.w1) that transformers fuses into
    3-D experts on load: eval places the converted ones through transformers' own loading (before: 'no place in the
    model'), and the model it evaluates is exactly the one load_model builds."""
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    from lplr_convert import load_model, load_state_dict
    from lplr_convert.pipeline.convert import ConvertOptions, convert

    tok = AutoTokenizer.from_pretrained(minilm_dir)
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=2, num_experts_per_tok=1)
    src, out = tmp_path / "mixtral", tmp_path / "rtn4"
    MixtralForCausalLM(cfg).save_pretrained(str(src))
    tok.save_pretrained(str(src))
    doc = convert(ConvertOptions(in_path=str(src), out_path=str(out), layer={"method": "rtn", "b0": 4},
                                 write_report=False))
    required = {r["name"] for r in doc["tensors"] if r["method"] != "copy"}
    assert any(".experts.1.w2." in n for n in required)
    res = evaluate(src, out, text=TEXTS[:6])
    assert res["kind"] == "causal_lm" and res["kl_mean"] > 0
    model = MixtralForCausalLM.from_pretrained(str(src)).eval()
    ev._overwrite_weights(model, load_state_dict(out).items(), required)
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, load_model(out, factored=False)(input_ids=ids).logits)


@pytest.mark.parametrize(("family", "positions", "tokens"), [("roberta", 24, 23), ("gpt2", 24, 24)])
def test_texts_longer_than_the_models_positions_are_truncated_to_them(tmp_path, family, positions, tokens):
    """The position table bounds every text (RoBERTa-style tables start after the padding index, here 0: 1 token fewer);
    before, texts longer than it crashed eval with an IndexError."""
    from calibration.tiny_checkpoints import build_with_positions
    from transformers import AutoModel

    from lplr_convert.hf.modeling import max_tokens

    src = build_with_positions(tmp_path / family, family, positions)
    assert max_tokens(AutoModel.from_pretrained(src)) == tokens
    long_texts = ["a fairly long sentence that has far more characters than the model has positions"] * 3
    sd = load_file(str(src / C.SAFE_SINGLE))
    same = evaluate_state_dict(src, sd, long_texts)
    if family == "roberta":
        assert same["cosine_min"] == pytest.approx(1.0, abs=1e-6)
    else:
        assert same["kl_mean"] == 0.0 and same["tokens"] == 3 * (tokens - 1)


def test_max_tokens_of_real_configs():
    """512 tokens for BERT (512 positions) and RoBERTa (514, padding index 1), 1024 for GPT-2, none when unset."""
    import transformers

    from lplr_convert.hf.modeling import max_tokens

    def build(cfg):
        with torch.device("meta"):
            return transformers.AutoModel.from_config(cfg)

    small = {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}
    assert max_tokens(build(transformers.BertConfig(**small))) == 512
    assert max_tokens(build(transformers.RobertaConfig(**small, max_position_embeddings=514, pad_token_id=1))) == 512
    assert max_tokens(build(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2))) == 1024
    assert max_tokens(torch.nn.Linear(2, 2)) is None


def test_eval_names_an_original_without_a_tokenizer(tiny_lm_dir, tmp_path):
    """An original with weights and config but no tokenizer files was 'unexpected ValueError: Couldn't instantiate
    the backend tokenizer'; now one line names the directory and the fix, and the conversion is left as it was."""
    from lplr_testing import error_line, run_cli, tree_state

    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy2(tiny_lm_dir / f, bare / f)
    out = tmp_path / "conv"
    assert run_cli("--in-path", str(bare), "--out-path", str(out), "--method", "rtn", "--no-report").exit_code == 0
    before = tree_state(bare, out)
    error_line(run_cli("eval", "--original", str(bare), "--converted", str(out)), str(bare), "no tokenizer files",
               "copy the model's tokenizer files")
    assert tree_state(bare, out) == before


def test_eval_refuses_an_original_that_is_not_the_converted_checkpoint(converted, minilm_dir, minilm_sd, tmp_path):
    """A MiniLM with perturbed weights (same type and shapes) was accepted as --original: eval stored cosine 0.02 in
    the manifest as the conversion's fidelity. The original's weight files must match the sha256 the manifest
    records; the refusal leaves both directories as they were."""
    from lplr_testing import error_line, run_cli, tree_state
    from safetensors.torch import save_file

    other = shutil.copytree(minilm_dir, tmp_path / "other")
    save_file(_perturbed(minilm_sd, 0.5), str(other / "model.safetensors"), metadata={"format": "pt"})
    out = shutil.copytree(converted("rtn"), tmp_path / "conv")
    before = tree_state(other, out)
    error_line(run_cli("eval", "--original", str(other), "--converted", str(out)), str(other),
               "is not the checkpoint", "model.safetensors differs", "pass the checkpoint that was converted")
    assert tree_state(other, out) == before


def test_decoder_quality_benchmark_runs_on_a_tiny_causal_lm(tiny_lm_dir, tmp_path):
    """scripts/quality.py --model: every row carries perplexities of the same float model on the same held-out
    tokens, bits/param within its budget, and errors (the output error from the statistics it calibrated)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, str(root / "scripts" / "quality.py"), "--model", str(tiny_lm_dir),
                           "--samples", "4", "--seq-len", "32", "--eval-tokens", "200", "--budgets", "4.25",
                           "--rows", "rtn sym g128,lplr published", "--write", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=root, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    metas, recs = [r["meta"] for r in rows if "meta" in r], [r for r in rows if "meta" not in r]
    assert "meta" in rows[0]  # each row appended after its run's meta as it finishes
    for meta in metas:
        assert meta["text"] == "heldout_prose.txt" and meta["tokens"] >= 200
    assert [r["label"] for r in recs] == ["rtn sym g128", "lplr published (8/8, rf 0.8)"]
    assert len({r["perplexity_float"] for r in recs}) == 1 and len({r["tokens"] for r in recs}) == 1
    rtn, lplr = recs
    assert rtn["bits_per_param"] <= 4.25 and lplr["bits_per_param"] > 8
    for r in recs:
        assert r["ppl_ratio"] == r["perplexity"] / r["perplexity_float"] and r["kl_mean"] >= 0
        assert 0 < r["weighted_rel_error"] < 1 and 0 < r["output_rel_error"] < 1.5
    assert "| ≤ 4.25 | rtn sym g128 |" in (tmp_path / "results.md").read_text()


def test_eval_names_a_tokenizer_larger_than_the_embedding_table(minilm_dir, tmp_path):
    """A causal LM whose embedding table is smaller than its tokenizer's vocabulary was 'unexpected IndexError' at
    the first forward; now one line names the largest token id, the table's rows and the fix."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lplr_testing import error_line, run_cli, tree_state

    tok = AutoTokenizer.from_pretrained(minilm_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,  # < len(tok)
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    src = tmp_path / "small_vocab"
    LlamaForCausalLM(cfg).save_pretrained(str(src))
    tok.save_pretrained(str(src))
    out = tmp_path / "conv"
    assert run_cli("--in-path", str(src), "--out-path", str(out), "--method", "rtn", "--no-report").exit_code == 0
    before = tree_state(src, out)
    error_line(run_cli("eval", "--original", str(src), "--converted", str(out)), "tokenizer gives token id",
               "embedding table has 1000 rows", "the model's own tokenizer")
    assert tree_state(src, out) == before
