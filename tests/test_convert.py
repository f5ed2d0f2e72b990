"""The streaming converter end to end: real checkpoints through the real CLI, loaded back."""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lplr_testing import run_cli

from lplr_convert import constants as C
from lplr_convert import load_model, load_state_dict
from lplr_convert.io.manifest import read_manifest
from lplr_convert.io.reader import open_source

ROOT = Path(__file__).resolve().parents[1]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _source_tensors(src: Path) -> dict[str, torch.Tensor]:
    return dict(open_source(str(src)).iter_tensors())


def _shard_headers(out: Path) -> dict[str, tuple[str, dict]]:
    """stored name -> (shard file, header entry), read from the shard files themselves."""
    found = {}
    for shard in sorted(out.glob("model-*-of-*.safetensors")):
        with open(shard, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        assert header["__metadata__"]["format"] == "pt"
        for k, v in header.items():
            if k != "__metadata__":
                found[k] = (shard.name, v)
    return found


@pytest.mark.parametrize("method", ["lplr", "lsvd", "laser", "rtn"])
def test_minilm_manifest_matches_files(converted, minilm_dir, method):
    out = converted(method)
    manifest = read_manifest(out)
    original = _source_tensors(minilm_dir)
    dense = load_state_dict(out)
    headers = _shard_headers(out)
    assert set(dense) == set(original)
    n_comp = 0
    for rec in manifest["tensors"]:
        name = rec["name"]
        W, W_hat = original[name], dense[name]
        assert W_hat.dtype == W.dtype and W_hat.shape == W.shape
        # every stored tensor of a weight sits in one shard, and its bytes are what the manifest claims
        shards = {headers[s][0] for s in rec["stored"]}
        assert shards == {rec["shard"]}
        nbytes = sum(headers[s][1]["data_offsets"][1] - headers[s][1]["data_offsets"][0] for s in rec["stored"])
        assert nbytes == rec["stored_bytes"]
        assert rec["bits_per_param"] == pytest.approx(8 * nbytes / W.numel(), rel=1e-12)
        err = ((W.double() - W_hat.double()).norm() / W.double().norm()).item() if W.numel() else 0.0
        if rec["method"] == "copy":
            assert torch.equal(W, W_hat)
        else:
            n_comp += 1
            assert rec["rel_error"] == pytest.approx(err, rel=1e-4, abs=1e-7)
    assert n_comp == 36  # 6 blocks x (q, k, v, attn out, intermediate, output)
    s = manifest["summary"]
    assert s["stored_bytes"] == sum(r["stored_bytes"] for r in manifest["tensors"])
    assert (out / "1_Pooling" / "config.json").read_bytes() == (minilm_dir / "1_Pooling" / "config.json").read_bytes()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == C.QUANT_METHOD


def test_minilm_lplr_bits_and_error_are_honest(converted):
    """LPLR at rank-fraction 0.8 with 8/8 bits stores about 10 bits/param on MiniLM's block weights (more than int8)."""
    s = read_manifest(converted("lplr"))["summary"]
    assert 9.0 < s["compressed_bits_per_param"] < 11.0
    r = read_manifest(converted("rtn"))["summary"]
    assert 8.0 <= r["compressed_bits_per_param"] < 8.5
    assert r["weighted_rel_error"] < s["weighted_rel_error"]


@pytest.mark.parametrize("method", ["lplr", "lsvd"])
def test_minilm_factored_equals_dense(converted, method):
    out = converted(method)
    mf, md = load_model(out, factored=True), load_model(out, factored=False)
    n_lowrank = sum(type(m).__name__ == "LowRankLinear" for m in mf.modules())
    assert n_lowrank == 36
    ids = torch.randint(0, 30000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = mf(input_ids=ids).last_hidden_state
        b = md(input_ids=ids).last_hidden_state
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_minilm_decompress_loads_in_sentence_transformers(converted, minilm_dir, tmp_path):
    from sentence_transformers import SentenceTransformer

    out = converted("lplr")
    dense_dir = tmp_path / "dense"
    res = run_cli("decompress", "--in-path", str(out), "--out-path", str(dense_dir))
    assert res.exit_code == 0, res.output
    assert not (dense_dir / C.MANIFEST_FILE).exists()
    assert "quantization_config" not in json.loads((dense_dir / "config.json").read_text())
    sentences = ["A man is playing a guitar.", "The weather is cold today.", "Stocks fell sharply on Monday."]
    st = SentenceTransformer(str(dense_dir), device="cpu")
    emb = st.encode(sentences, convert_to_tensor=True, normalize_embeddings=True)
    # same numbers as our own dense loader run through the original architecture
    ref = SentenceTransformer(str(minilm_dir), device="cpu")
    ref[0].auto_model.load_state_dict(load_state_dict(out), strict=False)
    emb_ref = ref.encode(sentences, convert_to_tensor=True, normalize_embeddings=True)
    assert torch.allclose(emb, emb_ref, atol=1e-5)
    orig = SentenceTransformer(str(minilm_dir), device="cpu").encode(sentences, convert_to_tensor=True,
                                                                     normalize_embeddings=True)
    cos = (emb * orig).sum(-1)
    assert (cos > 0.3).all() and (cos < 0.999).all()  # lossy, and honestly so


def test_tiny_llama_bf16_tied_sharded(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    res = run_cli("--in-path", str(tiny_llama_dir), "--out-path", str(out), "--rank-fraction", "0.5",
                  "--max-shard-size", "30KB", "--no-report")
    assert res.exit_code == 0, res.output
    manifest = read_manifest(out)
    assert len(manifest["shards"]) > 1
    index = json.loads((out / C.SAFE_INDEX).read_text())
    assert set(index["weight_map"].values()) == set(manifest["shards"])
    for shard, meta in manifest["shards"].items():
        assert re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", shard)
        assert _sha(out / shard) == meta["sha256"]
    original = _source_tensors(tiny_llama_dir)
    assert "lm_head.weight" not in original  # tied: not in the files
    dense = load_state_dict(out)
    assert {k: (v.dtype, v.shape) for k, v in dense.items()} == {k: (v.dtype, v.shape) for k, v in original.items()}
    methods = {r["name"]: r["method"] for r in manifest["tensors"]}
    assert methods["model.layers.0.mlp.gate_proj.weight"] == "lplr"
    assert methods["model.layers.1.self_attn.o_proj.weight"] == "lplr"
    assert methods["model.embed_tokens.weight"] == "copy"
    assert methods["model.norm.weight"] == "copy"
    mf, md = load_model(out, factored=True), load_model(out, factored=False)
    assert mf.lm_head.weight.data_ptr() == mf.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 96, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = mf(input_ids=ids).logits.float(), md(input_ids=ids).logits.float()
    assert (a - b).abs().max() < 0.05 * b.abs().max()  # bf16 arithmetic in two association orders


def test_tiny_gpt2_conv1d(tiny_gpt2_dir, tmp_path):
    from transformers import GPT2LMHeadModel

    out = tmp_path / "out"
    res = run_cli("--in-path", str(tiny_gpt2_dir), "--out-path", str(out), "--method", "lsvd", "--b1", "16",
                  "--b2", "16", "--rank-fraction", "1.0", "--no-report")
    assert res.exit_code == 0, res.output
    manifest = read_manifest(out)
    rec = {r["name"]: r for r in manifest["tensors"]}
    c_fc = rec["transformer.h.0.mlp.c_fc.weight"]
    assert c_fc["transposed"] and c_fc["matrix_type"] == "fc_in" and c_fc["shape"] == [48, 192]
    assert rec["transformer.h.1.attn.c_attn.weight"]["matrix_type"] == "qkv"
    assert rec["transformer.wte.weight"]["method"] == "copy"
    original = _source_tensors(tiny_gpt2_dir)
    dense = load_state_dict(out)
    assert dense["transformer.h.0.mlp.c_fc.weight"].shape == original["transformer.h.0.mlp.c_fc.weight"].shape
    # full rank, 16-bit factors: the model computes what the original computes
    ref = GPT2LMHeadModel.from_pretrained(str(tiny_gpt2_dir)).eval()
    mf = load_model(out, factored=True)
    assert type(mf.transformer.h[0].mlp.c_fc).__name__ == "LowRankLinear"
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = mf(input_ids=ids).logits, ref(input_ids=ids).logits
    assert (a - b).abs().max() < 1e-2 * b.abs().max()


def test_bin_input_and_fp16(tiny_bert_bin_dir, tmp_path):
    out = tmp_path / "out"
    res = run_cli("--in-path", str(tiny_bert_bin_dir), "--out-path", str(out), "--method", "rtn", "--b0", "8",
                  "--no-report")
    assert res.exit_code == 0, res.output
    manifest = read_manifest(out)
    assert manifest["source"]["kind"] == "bin"
    assert not list(out.glob("*.bin"))
    original = torch.load(tiny_bert_bin_dir / "pytorch_model.bin", weights_only=True)
    dense = load_state_dict(out)
    assert set(dense) == set(original)
    w = "encoder.layer.1.intermediate.dense.weight"
    assert dense[w].dtype == torch.float16
    assert ((dense[w].float() - original[w].float()).norm() / original[w].float().norm()) < 0.01


def test_recipe_composes_laser_and_lplr(tiny_llama_dir, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "defaults: {method: lplr, rank_fraction: 0.5, b1: 4, b2: 4}\n"
        "rules:\n"
        "  - {layers: [1], types: [fc_in, fc_up], method: laser, rho: 0.1}\n"
        "  - {pattern: 'self_attn\\.v_proj', method: rtn, b0: 4}\n")
    out = tmp_path / "out"
    res = run_cli("--in-path", str(tiny_llama_dir), "--out-path", str(out), "--recipe", str(recipe), "--no-report")
    assert res.exit_code == 0, res.output
    rec = {r["name"]: r for r in read_manifest(out)["tensors"]}
    assert rec["model.layers.1.mlp.gate_proj.weight"]["method"] == "laser"
    assert rec["model.layers.1.mlp.gate_proj.weight"]["rank"] == 6  # int(0.1 * 64)
    assert rec["model.layers.1.mlp.up_proj.weight"]["method"] == "laser"
    assert rec["model.layers.0.mlp.gate_proj.weight"]["method"] == "lplr"
    assert rec["model.layers.0.mlp.gate_proj.weight"]["b1"] == 4
    assert rec["model.layers.1.mlp.down_proj.weight"]["method"] == "lplr"
    assert rec["model.layers.0.self_attn.v_proj.weight"]["method"] == "rtn"
    assert rec["model.embed_tokens.weight"]["method"] == "copy"


def test_laser_layers_and_types_options(tiny_gpt2_dir, tmp_path):
    out = tmp_path / "out"
    res = run_cli("--in-path", str(tiny_gpt2_dir), "--out-path", str(out), "--method", "laser", "--rate", "9",
                  "--layers", "1", "--types", "fc_in", "--no-report")
    assert res.exit_code == 0, res.output
    done = [r for r in read_manifest(out)["tensors"] if r["method"] != "copy"]
    assert [r["name"] for r in done] == ["transformer.h.1.mlp.c_fc.weight"]
    assert done[0]["rank"] == 4  # rho = 1 - 0.1 * 9 = 0.1 of min(48, 192)


def test_rerun_is_byte_identical(tiny_llama_dir, tmp_path):
    outs = []
    for i in range(2):
        out = tmp_path / f"out{i}"
        res = run_cli("--in-path", str(tiny_llama_dir), "--out-path", str(out), "--seed", "7", "--max-shard-size",
                      "30KB", "--no-report")
        assert res.exit_code == 0, res.output
        outs.append(out)
    shards = sorted(p.name for p in outs[0].glob("model-*.safetensors"))
    assert shards == sorted(p.name for p in outs[1].glob("model-*.safetensors"))
    for s in shards:
        assert _sha(outs[0] / s) == _sha(outs[1] / s)
    assert _sha(outs[0] / C.SAFE_INDEX) == _sha(outs[1] / C.SAFE_INDEX)


def test_inspect_predicts_size(converted, minilm_dir):
    res = run_cli("inspect", "--in-path", str(minilm_dir), "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    out = converted("lplr")
    real = sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and p.name not in (
        C.MANIFEST_FILE, C.SAFE_INDEX, C.PROGRESS_FILE) and not p.name.startswith("lplr_report")
        and p.suffix != ".png")
    assert abs(info["predicted_output_bytes"] - real) / real < 0.01
    assert info["n_compressed"] == 36


def test_readme_first_command(tmp_path):
    """The README's first command (minus the install step) converts the bundled checkpoint and prints a summary."""
    readme = (ROOT / "README.md").read_text()
    first = re.findall(r"```bash\n(.*?)\n```", readme, re.DOTALL)[0]
    assert first.startswith("./install.sh && ")
    cmd = shlex.split(first.split("&&", 1)[1])
    assert cmd[0] == ".venv/bin/lplr-convert"
    out_i = cmd.index("--out-path")
    cmd[out_i + 1] = str(tmp_path / "readme-out")
    proc = subprocess.run([sys.executable, "-m", "lplr_convert.cli", *cmd[1:]], check=False, capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "bits/param" in proc.stdout
    read_manifest(tmp_path / "readme-out")
