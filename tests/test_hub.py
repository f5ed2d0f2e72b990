"""Hub push and model card, end to end with the real huggingface_hub client against a loopback Hub (hub_server.py)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hub_server import VALID_TOKEN, HubServer
from huggingface_hub import ModelCard
from loguru import logger
from lplr_testing import run_cli
from safetensors.torch import save_file

from lplr_convert import constants as C
from lplr_convert.publish.card import base_model_of, build_model_card
from lplr_convert.errors import IncompleteOutputError, LplrError
from lplr_convert.publish.hub import push
from lplr_convert.io.manifest import Manifest, integrity_hash

BASE = "sentence-transformers/all-MiniLM-L6-v2"
COMMAND = "lplr-convert convert --in-path /models/minilm --out-path /tmp/minilm-lplr --method lplr --b1 8 --b2 8"
SOURCE_README = "---\nlicense: apache-2.0\nlanguage: en\npipeline_tag: sentence-similarity\n---\n\n# the source card\n"
EVAL = {"kind": "encoder", "texts": 40, "text_source": "bundled", "cosine_mean": 0.9871, "cosine_min": 0.9412,
        "neighbour_kept": 0.95}
LFS_THRESHOLD = 64 * 1024  # shards are above it, json files below


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_output_dir(root: Path, *, source_repo: str | None = BASE, ev: dict | None = EVAL, complete: bool = True,
                    rel_error: float = 0.3188, stored_bytes: int = 1242000) -> Path:
    """A small conversion output following the contract in common.md: 3 real shards, configs, a copied README."""
    out = root / "out"
    (out / "1_Pooling").mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    tensors, shards, weight_map = [], {}, {}
    for i in range(3):
        name = C.SHARD_TEMPLATE.format(index=i + 1, total=3)
        w = f"encoder.layer.{i}.intermediate.dense.weight"
        parts = {f"{w}.{C.PART_LEFT}.{C.FIELD_PACKED}": torch.randint(0, 255, (40000 + 1000 * i,), generator=g,
                                                                       dtype=torch.uint8),
                 f"{w}.{C.PART_RIGHT}.{C.FIELD_PACKED}": torch.randint(0, 255, (30000,), generator=g,
                                                                        dtype=torch.uint8),
                 f"{w}.{C.PART_LEFT}.{C.FIELD_SCALE}": torch.rand(96, generator=g),
                 f"encoder.layer.{i}.output.LayerNorm.weight": torch.randn(384, generator=g)}
        save_file(parts, out / name, metadata={C.META_FORMAT_KEY: C.META_FORMAT_VALUE})
        shards[name] = {"sha256": sha256(out / name), "bytes": (out / name).stat().st_size}
        weight_map.update({k: name for k in parts})
        tensors.append({"name": w, "shape": [1536, 384], "dtype": "float32", "method": "lplr", "layer": i,
                        "matrix_type": "fc_in", "rank": 308, "b1": 8, "b2": 8, "shard": name,
                        "original_bytes": 2359296, "stored_bytes": stored_bytes,
                        "bits_per_param": 8 * stored_bytes / (1536 * 384), "rel_error": rel_error,
                        "energy_kept": None, "seconds": 0.04, "grew": False})
        tensors.append({"name": f"encoder.layer.{i}.output.LayerNorm.weight", "shape": [384], "dtype": "float32",
                        "method": "copy", "layer": i, "matrix_type": None, "rank": None, "shard": name,
                        "original_bytes": 1536, "stored_bytes": 1536, "bits_per_param": 32.0, "rel_error": 0.0})
    (out / C.SAFE_INDEX).write_text(json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map}, indent=2))
    (out / C.CONFIG_FILE).write_text(json.dumps({"model_type": "bert", "hidden_size": 384, "quantization_config": {
        "quant_method": C.QUANT_METHOD}}))
    (out / "tokenizer.json").write_text(json.dumps({"vocab": {f"tok{i}": i for i in range(200)}}))
    (out / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    (out / C.MODEL_CARD).write_text(SOURCE_README)
    (out / "stray.safetensors.partial").write_bytes(b"leftover of an interrupted write")
    files = {p: {"sha256": sha256(out / p), "bytes": (out / p).stat().st_size}  # the index too, as convert lists it
             for p in (C.CONFIG_FILE, "tokenizer.json", "1_Pooling/config.json", C.MODEL_CARD, C.SAFE_INDEX)}
    manifest = {
        "format_version": C.FORMAT_VERSION, "tool": C.TOOL_NAME, "tool_version": "0.1.0", "complete": complete,
        "source": {"path": "/models/minilm", "repo_id": source_repo, "revision": None, "model_type": "bert",
                   "architectures": ["BertModel"], "files": {"model.safetensors": "0" * 64},
                   "base_model": source_repo, "base_model_from": "hub" if source_repo else None},
        "options": {"command": COMMAND, "seed": 0, "device": "cpu",
                    "settings": {"method": "lplr", "b1": 8, "b2": 8, "b0": 8, "quantizer": "channel",
                                 "rank": {"kind": "rank_fraction", "value": 0.8}},
                    "include": None, "exclude": None, "layers": None, "types": None, "recipe": None},
        "tensors": tensors, "shards": shards, "files": files,
        "summary": {"n_tensors": 6, "n_compressed": 3, "params": 1770624, "compressed_params": 1769472,
                               "original_bytes": 7082496, "stored_bytes": 3730608, "bits_per_param": 16.86,
                               "compressed_bits_per_param": 8.09, "weighted_rel_error": 0.3187, "seconds": 0.5,
                               "grown": [], "slowest": [["encoder.layer.0.intermediate.dense.weight", 0.04]]},
        "eval": ev,
    }
    manifest[C.M_INTEGRITY] = integrity_hash(manifest)
    (out / C.MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return out


def expected_files(out: Path) -> dict[str, Path]:
    """The local files a push must upload as they are: all but the partial one and README.md (the card's place)."""
    return {p.relative_to(out).as_posix(): p for p in sorted(out.rglob("*"))
            if p.is_file() and not p.name.endswith(C.PARTIAL_SUFFIX) and p.name != C.MODEL_CARD}


def snapshot(out: Path) -> dict[str, str]:
    return {p.relative_to(out).as_posix(): sha256(p) for p in out.rglob("*") if p.is_file()}


def assert_pushed(hub: HubServer, repo: str, out: Path, revision: str = "main", base: str | None = BASE) -> None:
    """Every file arrived byte-identical, the card replaced README.md and parses, nothing else was uploaded."""
    stored = hub.files(repo, revision)
    want = expected_files(out)
    assert set(stored) == set(want) | {".gitattributes", C.MODEL_CARD}
    for rel, path in want.items():
        assert sha256(stored[rel]) == sha256(path), rel
    card = ModelCard.load(stored[C.MODEL_CARD])
    assert str(card) == str(build_model_card(out, repo_id=repo))
    assert card.data.base_model == base
    assert card.data.to_dict().get("base_model_relation") == ("quantized" if base else None)
    assert hub.errors == []


@pytest.fixture
def isolated_env(tmp_path, monkeypatch):
    """No real token or login cache leaks into a test; no telemetry."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # tests/conftest.py turns offline mode on
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))


@pytest.fixture
def hub(tmp_path, monkeypatch, isolated_env):
    """A loopback Hub that marks every file "regular" (the default Xet-enabled client sends them in the commit)."""
    with HubServer(tmp_path / "hub") as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", VALID_TOKEN)
        yield server


@pytest.fixture
def lfs_hub(tmp_path, monkeypatch, isolated_env):
    """A loopback Hub that sends large files through the LFS batch API (the client runs with Xet disabled)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    with HubServer(tmp_path / "hub", lfs_threshold=LFS_THRESHOLD) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", VALID_TOKEN)
        yield server


def run_cli_process(*args: str, env: dict) -> subprocess.CompletedProcess:
    """`lplr-convert ARGS` in a fresh process whose huggingface_hub reads only `env` (no HF_* of this process)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    return subprocess.run([sys.executable, "-m", "lplr_convert.cli", *args], env={**base, **env},
                          capture_output=True, text=True, timeout=120, check=False)


# ---------------------------------------------------------------------------------------------------- model card
def test_card_metadata_and_content(tmp_path):
    out = make_output_dir(tmp_path)
    card = build_model_card(out, repo_id="me/minilm-lplr")
    data = card.data
    assert data.base_model == BASE and data.base_model_relation == "quantized"
    assert data.library_name == C.TOOL_NAME
    assert {"lplr-convert", "low-rank", "quantized", "lplr"} <= set(data.tags)
    assert "copy" not in data.tags
    assert (data.license, data.language, data.pipeline_tag) == ("apache-2.0", "en", "sentence-similarity")
    text = card.text
    assert f"```bash\n{COMMAND}\n```" in text  # the exact command
    assert "16.86 bits per parameter" in text and "0.3188" in text and "31.9 %" in text  # the headline numbers
    assert "| size before → after | 7.08 MB → 3.73 MB (ratio 0.527) |" in text  # the report's summary table
    assert "| lplr | 3 | 1,769,472 | 16.85 |" in text and "| copy | 3 | 1,152 | 32.00 |" in text  # per method
    assert "| mean cosine (original vs converted) | 0.9871 |" in text  # fidelity from manifest["eval"]
    assert "| nearest neighbour unchanged | 95.0 % |" in text and "No model-level fidelity" not in text
    assert "`rank=rank_fraction:0.8`" in text and "`seed=0`" in text
    assert 'snapshot_download("me/minilm-lplr")' in text and "load_model(path)" in text
    assert "import lplr_convert" in text and '.from_pretrained("me/minilm-lplr")' in text
    assert "load_state_dict(path)" in text
    reparsed = ModelCard(str(card))  # what the Hub and ModelCard.load see
    assert reparsed.data.to_dict() == data.to_dict() and reparsed.text == text


def test_card_is_honest_about_bad_numbers_and_missing_facts(tmp_path):
    out = make_output_dir(tmp_path, source_repo=None, ev=None, rel_error=1.37, stored_bytes=3_000_000)
    (out / C.MODEL_CARD).unlink()
    card = build_model_card(out)
    assert card.data.base_model is None and card.data.license is None
    assert "base_model_relation" not in card.data.to_dict()  # the Hub requires base_model with a relation
    assert "1.3700" in card.text and "137.0 %" in card.text  # a dreadful error is shown as it is
    assert "40.68 bits per parameter (the source: 32.00)" in card.text  # and so is a model that grew
    assert "stored LARGER than in the source" in card.text
    assert "`encoder.layer.1.intermediate.dense.weight`" in card.text
    assert "No model-level fidelity evaluation was recorded" in card.text
    assert "`minilm`" in card.text and "# out" in card.text  # no repo id: the source's and the directory's names


def test_base_model_is_found_in_the_bundled_minilm_and_recorded(converted, minilm_dir):
    """The bundled copy has no Hub id; its README's usage code loads itself by repo id. config.json's
    _name_or_path names the checkpoint it was trained from, which must not be taken for it."""
    assert json.loads((minilm_dir / "config.json").read_text())["_name_or_path"] != BASE
    assert base_model_of(minilm_dir) == (BASE, "source README usage")
    out = converted("rtn")
    source = json.loads((out / C.MANIFEST_FILE).read_text())["source"]
    assert (source["base_model"], source["base_model_from"], source["repo_id"]) == (BASE, "source README usage", None)
    card = build_model_card(out)
    assert card.data.base_model == BASE and card.data.base_model_relation == "quantized"
    assert f"[{BASE}](https://huggingface.co/{BASE})" in card.text


def test_base_model_from_the_hub_cache_path_and_from_nothing(tmp_path):
    snap = tmp_path / "hub" / "models--some-org--tiny.model-v2" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    assert base_model_of(snap) == ("some-org/tiny.model-v2", "hub cache path")
    assert base_model_of(tmp_path, "org/from-hub") == ("org/from-hub", "hub")
    (tmp_path / C.MODEL_CARD).write_text("# a card\n\n```python\nAutoModel.from_pretrained('bert-base-uncased')\n```\n")
    assert base_model_of(tmp_path) == (None, None)  # no OWNER/NAME self-reference: nothing is guessed


def test_base_model_is_the_repo_the_readme_loads_not_the_one_it_was_made_from(tmp_path):
    """A fine-tune's card names its parent in `base_model` metadata and loads itself in its usage code."""
    (tmp_path / C.MODEL_CARD).write_text(
        "---\nlicense: apache-2.0\nbase_model: meta-llama/Llama-3.2-1B\n---\n# Tiny\nFine-tuned from "
        "meta-llama/Llama-3.2-1B.\n```python\nmodel = AutoModelForCausalLM.from_pretrained(\"acme/tiny-llama\")\n```\n")
    assert base_model_of(tmp_path) == ("acme/tiny-llama", "source README usage")


def test_base_model_override_on_convert_and_push(tmp_path, tiny_llama_dir, capsys):
    out = tmp_path / "out"
    res = run_cli("--in-path", str(tiny_llama_dir), "--out-path", str(out), "--method", "rtn", "--no-report",
                  "--base-model", "me/tiny-llama")
    assert res.exit_code == 0, res.output
    source = json.loads((out / C.MANIFEST_FILE).read_text())["source"]
    assert (source["base_model"], source["base_model_from"]) == ("me/tiny-llama", "given")
    assert build_model_card(out).data.base_model == "me/tiny-llama"
    assert build_model_card(out, base_model="other/base").data.base_model == "other/base"
    card = push(out, "tester/m", dry_run=True, base_model="other/base")["card"]
    assert "base_model: other/base" in card and "base_model_relation: quantized" in card
    res = run_cli("push", "--in-path", str(out), "--repo-id", "tester/m", "--base-model", "not a repo", "--dry-run")
    assert res.exit_code == 1 and "--base-model" in res.output and "\n" not in res.output.strip()
    res = run_cli("--in-path", str(tiny_llama_dir), "--out-path", str(tmp_path / "o2"), "--base-model", "x")
    assert res.exit_code == 1 and "--base-model my-user/my-model-lplr" in res.output


# ---------------------------------------------------------------------------------------------------- push
def test_push_end_to_end_with_the_cli_in_a_fresh_process(tmp_path, hub):
    """`lplr-convert push` with the client configured only through the environment (read at import time)."""
    out = make_output_dir(tmp_path)
    before = snapshot(out)
    env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": VALID_TOKEN, "HF_HOME": str(tmp_path / "hf_home"),
           "HF_HUB_VERBOSITY": "debug", "HF_HUB_DISABLE_TELEMETRY": "1"}
    proc = run_cli_process("push", "--in-path", str(out), "--repo-id", "tester/minilm-lplr", "--commit-message", "first push",
                   "--debug", env=env)
    assert proc.returncode == 0, proc.stderr
    assert_pushed(hub, "tester/minilm-lplr", out)
    head = hub.head("tester/minilm-lplr")
    assert head.message == "first push"
    assert f"{hub.url}/tester/minilm-lplr/commit/{head.oid}" in proc.stderr  # logged by push
    assert f"pushed {len(expected_files(out)) + 1} files to {hub.url}/tester/minilm-lplr" in proc.stdout
    assert VALID_TOKEN not in proc.stdout + proc.stderr  # not even in our or huggingface_hub's debug logs
    assert "(authenticated: True)" in proc.stderr  # (huggingface_hub's debug log of every request did run)
    assert snapshot(out) == before  # the output directory is left untouched (its README.md too)
    assert hub.count("POST", "/commit/") == 1  # one commit: the repo never holds half a model


@pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")  # huggingface_hub's own LFS PUT
def test_push_resumes_after_a_failed_lfs_upload_and_skips_unchanged_files(tmp_path, lfs_hub):
    out = make_output_dir(tmp_path)
    repo = "tester/minilm-lplr"
    shards = sorted(out.glob("model-*.safetensors"))
    failing = sha256(shards[1])
    lfs_hub.inject_fault("PUT", f"/lfs-upload/{failing}")
    with pytest.raises(LplrError) as err:
        push(out, repo)
    message = str(err.value)
    assert "\n" not in message and "HTTP 507" in message and "re-run the same push" in message
    assert list(lfs_hub.files(repo)) == [".gitattributes"]  # nothing committed
    assert lfs_hub.count("PUT") == 3  # the other two shards reached storage

    result = push(out, repo)  # re-run: only the shard that failed travels again
    assert lfs_hub.count("PUT") == 4 and lfs_hub.count("PUT", failing) == 2
    assert_pushed(lfs_hub, repo, out)
    assert all(lfs_hub.head(repo).files[s.name].lfs for s in shards)
    assert not lfs_hub.head(repo).files[C.CONFIG_FILE].lfs

    again = push(out, repo)  # nothing changed: no upload, no new commit
    assert lfs_hub.count("PUT") == 4 and lfs_hub.count("POST", "/commit/") == 1
    assert again["commit_id"] == result["commit_id"] == lfs_hub.head(repo).oid


@pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")
def test_real_conversion_round_trips_through_the_hub(tmp_path, lfs_hub, tiny_llama_dir):
    """A real conversion (report and plots included) pushed, rebuilt from what the Hub stored, loads identically."""
    from lplr_convert import load_state_dict
    from lplr_convert.pipeline.convert import ConvertOptions, convert

    out = tmp_path / "tiny-llama-lplr"
    convert(ConvertOptions(in_path=str(tiny_llama_dir), out_path=str(out), command="lplr-convert ... (test)"))
    result = push(out, "tester/tiny-llama-lplr")
    assert_pushed(lfs_hub, "tester/tiny-llama-lplr", out, base=None)
    assert {C.REPORT_MD, C.PLOT_ERROR, C.SAFE_INDEX} <= {f["path"] for f in result["files"]}
    card = (lfs_hub.files("tester/tiny-llama-lplr")[C.MODEL_CARD]).read_text()
    assert f"`{C.REPORT_MD}`" in card and "lplr-convert ... (test)" in card
    assert f"]({C.PLOT_ERROR})" in card  # the error plot is shown in the card, and it was uploaded next to it
    downloaded = tmp_path / "downloaded"
    for rel, blob in lfs_hub.files("tester/tiny-llama-lplr").items():
        (downloaded / rel).parent.mkdir(parents=True, exist_ok=True)
        (downloaded / rel).write_bytes(blob.read_bytes())
    ours, theirs = load_state_dict(out), load_state_dict(downloaded)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_push_resumes_after_a_failed_commit(tmp_path, hub):
    out = make_output_dir(tmp_path)
    hub.inject_fault("POST", "/commit/")
    with pytest.raises(LplrError, match="re-run the same push"):
        push(out, "tester/m")
    push(out, "tester/m")
    assert_pushed(hub, "tester/m", out)


def test_private_repo_on_a_new_branch(tmp_path, hub):
    out = make_output_dir(tmp_path)
    result = push(out, "tester/m", private=True, revision="lplr")
    assert hub.repos["tester/m"].private
    assert_pushed(hub, "tester/m", out, revision="lplr")
    assert list(hub.files("tester/m", "main")) == [".gitattributes"]
    assert result["revision"] == "lplr" and result["commit_id"] == hub.head("tester/m", "lplr").oid
    push(out, "tester/m", revision="lplr")  # the branch exists now: still fine


def test_private_is_refused_for_an_existing_public_repo(tmp_path, hub):
    out = make_output_dir(tmp_path)
    first = push(out, "tester/m")
    with pytest.raises(LplrError) as err:
        push(out, "tester/m", private=True)
    assert "already exists and is public, so --private cannot apply" in err.value.cli_message()
    assert hub.head("tester/m").oid == first["commit_id"] and hub.count("POST", "/commit/") == 1


def test_a_token_recorded_in_the_output_is_never_published(tmp_path, hub):
    out = make_output_dir(tmp_path)
    (out / "tokenizer_config.json").write_text(json.dumps({"note": f"converted with token {VALID_TOKEN}"}))
    with pytest.raises(LplrError, match="tokenizer_config.json contains your Hub token") as err:
        push(out, "tester/m")
    assert VALID_TOKEN not in str(err.value) and "\n" not in str(err.value)
    assert hub.requests == []  # refused before contacting the Hub


@pytest.mark.parametrize("where", ["notes.log", "sub/extra.bin", "big.dat"])
def test_a_token_in_any_file_to_upload_is_never_published(tmp_path, hub, where):
    """Every file is scanned, whatever its suffix or size: the big one (sparse, 65 MiB, above the old 64 MiB limit)
    holds the token across the scanner's 16 MiB chunk boundary."""
    out = make_output_dir(tmp_path)
    path = out / where
    path.parent.mkdir(exist_ok=True)
    needle = VALID_TOKEN.encode()
    if where == "big.dat":
        with open(path, "wb") as f:
            f.truncate(65 << 20)
            f.seek((1 << 24) - len(needle) // 2)
            f.write(needle)
    else:
        path.write_bytes(b"\x00log line: " + needle + b"\n")
    with pytest.raises(LplrError, match=f"{where} contains your Hub token") as err:
        push(out, "tester/m")
    assert VALID_TOKEN not in str(err.value)
    assert hub.requests == []


def test_the_chunked_token_scan_finds_every_split(tmp_path):
    """Against `needle in data` for the token at every position and every chunk size, and for a file holding all
    of the token but its last byte (never found)."""
    from lplr_convert.publish.hub import _file_contains

    needle, path = b"hf_secret", tmp_path / "f"
    for pos in range(24 - len(needle) + 1):
        for data in (b"x" * pos + needle + b"x" * (24 - pos - len(needle)), b"x" * pos + needle[:-1]):
            path.write_bytes(data)
            for chunk in range(1, 12):
                assert _file_contains(path, needle, chunk) == (needle in data), (pos, chunk, data)


def test_token_from_argument_and_from_the_login_cache(tmp_path, hub, monkeypatch):
    from huggingface_hub import constants

    out = make_output_dir(tmp_path)
    monkeypatch.delenv("HF_TOKEN")
    push(out, "tester/a", token=VALID_TOKEN)
    cache = Path(constants.HF_TOKEN_PATH)
    cache.parent.mkdir(parents=True)
    cache.write_text(VALID_TOKEN)
    push(out, "tester/b")
    assert_pushed(hub, "tester/a", out)
    assert_pushed(hub, "tester/b", out)


def test_wrong_token_is_a_one_line_error_that_never_shows_the_token(tmp_path, hub):
    out = make_output_dir(tmp_path)
    wrong = "hf_thisIsAWrongTokenThatMustNeverBePrinted"
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf_home")}
    proc = run_cli_process("push", "--in-path", str(out), "--repo-id", "tester/m", "--token", wrong, env=env)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: the Hub at ")  # one line
    assert "rejected the token (401" in proc.stderr and "--token" in proc.stderr  # names the fix
    assert wrong not in proc.stdout + proc.stderr
    assert hub.sent() == [("GET", "/api/whoami-v2")]  # nothing else was sent
    assert "tester/m" not in hub.repos


def test_missing_token(tmp_path, hub, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(LplrError, match=r"no Hugging Face token found; pass --token, set HF_TOKEN") as err:
        push(make_output_dir(tmp_path), "tester/m")
    assert "\n" not in str(err.value) and hub.requests == []


def test_offline_mode_is_named(tmp_path, hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(LplrError, match="unset HF_HUB_OFFLINE"):
        push(make_output_dir(tmp_path), "tester/m")
    assert hub.requests == []


def test_namespace_without_write_access_is_a_403_error(tmp_path, hub):
    with pytest.raises(LplrError, match=r"may not write to someone-else/m \(403 Forbidden") as err:
        push(make_output_dir(tmp_path), "someone-else/m")
    assert "\n" not in str(err.value) and VALID_TOKEN not in str(err.value)


def test_unreachable_hub(tmp_path, isolated_env, monkeypatch):
    with socket.socket() as s:  # a loopback port that nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_TOKEN", VALID_TOKEN)
    t0 = time.perf_counter()
    with pytest.raises(LplrError, match=rf"cannot reach the Hub at http://127.0.0.1:{port} .*HF_ENDPOINT") as err:
        push(make_output_dir(tmp_path), "tester/m")
    assert "\n" not in str(err.value) and time.perf_counter() - t0 < 10


def test_dry_run_lists_files_and_card_and_sends_nothing(tmp_path, hub, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN")  # a dry run needs no token, and says that none was found
    out = make_output_dir(tmp_path)
    result = push(out, "tester/m", dry_run=True)
    printed = capsys.readouterr().out
    assert hub.requests == [] and hub.repos == {}
    card = str(build_model_card(out, repo_id="tester/m"))
    sizes = {f["path"]: f["bytes"] for f in result["files"]}
    want = {rel: p.stat().st_size for rel, p in expected_files(out).items()}
    want[C.MODEL_CARD] = len(card.encode())
    assert sizes == want and result["card"] == card and result["dry_run"] is True
    assert all(rel in printed for rel in want) and card.strip() in printed
    assert "nothing was sent" in printed and "Token: none found" in printed
    monkeypatch.setenv("HF_TOKEN", VALID_TOKEN)
    push(out, "tester/m", dry_run=True)
    assert "Token: found (HF_TOKEN)" in capsys.readouterr().out and VALID_TOKEN not in printed


def test_token_never_logged_in_process(tmp_path, hub, capfd):
    from huggingface_hub.utils import logging as hf_logging

    lines = []
    sink = logger.add(lines.append, level="DEBUG")
    hf_logging.set_verbosity_debug()
    try:
        push(make_output_dir(tmp_path), "tester/m", token=VALID_TOKEN)
    finally:
        hf_logging.set_verbosity_warning()
        logger.remove(sink)
    captured = capfd.readouterr()
    assert lines and VALID_TOKEN not in "".join(lines) + captured.out + captured.err


def test_refuses_incomplete_or_damaged_outputs_before_sending_anything(tmp_path, hub):
    with pytest.raises(IncompleteOutputError):
        push(make_output_dir(tmp_path / "a", complete=False), "tester/m")
    out = make_output_dir(tmp_path / "b")
    next(out.glob("model-*.safetensors")).unlink()
    with pytest.raises(LplrError, match="missing although lplr_manifest.json lists it"):
        push(out, "tester/m")
    with pytest.raises(LplrError, match="not of the form OWNER/NAME"):
        push(make_output_dir(tmp_path / "c"), "no-namespace")
    assert hub.requests == []


def test_a_dry_run_refuses_what_the_push_would_refuse_for_a_leaked_token(tmp_path, hub):
    """The dry run listed a binary holding the token as fine to upload while the real push refused it; with a token
    known (here HF_TOKEN) it now gives the same one-line error, and still sends nothing."""
    from lplr_testing import error_line

    out = make_output_dir(tmp_path)
    (out / "weights.dat").write_bytes(os.urandom(5000) + VALID_TOKEN.encode() + os.urandom(100))
    line = error_line(run_cli("push", "--in-path", str(out), "--repo-id", "tester/m", "--dry-run"),
                      "weights.dat contains your Hub token")
    assert VALID_TOKEN not in line and hub.requests == []


def test_push_never_follows_a_link_nor_publishes_a_changed_output(tmp_path, hub):
    """A link in the output (here to a file outside it) was uploaded with the target's bytes, and a config.json edited
    after the conversion was published though verify rejects it; both are refused before anything is sent."""
    from lplr_testing import error_line, tree_state

    out = make_output_dir(tmp_path)
    secret = tmp_path / "elsewhere" / "id_rsa"
    secret.parent.mkdir()
    secret.write_text("private")
    (out / "notes.txt").symlink_to(secret)
    before = tree_state(out, secret.parent)
    for extra in ([], ["--dry-run"]):
        error_line(run_cli("push", "--in-path", str(out), "--repo-id", "tester/m", *extra), "notes.txt",
                   "symbolic link", "outside")
    (out / "notes.txt").unlink()
    config = json.loads((out / C.CONFIG_FILE).read_text())
    (out / C.CONFIG_FILE).write_text(json.dumps({**config, "hidden_act": "relu"}))
    for extra in ([], ["--dry-run"]):
        error_line(run_cli("push", "--in-path", str(out), "--repo-id", "tester/m", *extra), "config.json",
                   "does not match its sha256", "--overwrite")
    assert hub.requests == [] and hub.repos == {}
    before.pop(str(out / "notes.txt"))
    before.pop(str(out / C.CONFIG_FILE))
    after = tree_state(out, secret.parent)
    after.pop(str(out / C.CONFIG_FILE))
    assert after == before


def test_a_push_reads_each_listed_file_once_for_its_hash_and_the_token(tmp_path, hub, monkeypatch):
    """The manifest's sha256 check and the token search share one read of each listed file (two full passes over a
    large model's shards before); a listed file holding the token is still refused."""
    import builtins

    from lplr_convert.publish import hub as hub_module

    out = make_output_dir(tmp_path)
    listed = {out / rel for rel in Manifest.from_json(json.loads((out / C.MANIFEST_FILE).read_text())).shards}
    reads: dict[Path, int] = {}

    def counting_open(path, mode="r", *a, **kw):
        if "b" in mode and Path(path) in listed:
            reads[Path(path)] = reads.get(Path(path), 0) + 1
        return builtins.open(path, mode, *a, **kw)

    from lplr_convert.io import manifest as manifest_module

    for module in (hub_module, manifest_module):  # the token search, and sha256_file where it is used instead
        monkeypatch.setattr(module, "open", counting_open, raising=False)
    push(out, "tester/m", dry_run=True)  # with HF_TOKEN set: the dry run searches for it as the push would
    assert listed and reads == dict.fromkeys(listed, 1)


def test_push_holds_the_output_s_lock_against_a_convert_overwrite_in_another_process(tmp_path, hub, tiny_llama_dir,
                                                                                     monkeypatch):
    """A `convert --overwrite` of the directory started (in another process) while push uploads it is refused, so the
    repo gets one conversion whole (its weights with its own card and manifest); and a push started while another
    process writes the directory is refused before anything is sent."""
    from huggingface_hub import HfApi

    from lplr_convert.pipeline.convert import ConvertOptions, convert

    out = tmp_path / "tiny"
    convert(ConvertOptions(in_path=str(tiny_llama_dir), out_path=str(out), write_report=False))
    before = snapshot(out)
    rival: list[subprocess.CompletedProcess] = []
    commit = HfApi.create_commit

    def commit_while_a_rival_converts(self, *a, **kw):
        rival.append(subprocess.run(
            [sys.executable, "-m", "lplr_convert.cli", "--in-path", str(tiny_llama_dir), "--out-path", str(out),
             "--overwrite", "--method", "rtn", "--no-report"], capture_output=True, text=True, timeout=300))
        return commit(self, *a, **kw)

    monkeypatch.setattr(HfApi, "create_commit", commit_while_a_rival_converts)
    push(out, "tester/tiny")
    assert rival[0].returncode != 0 and "being written by another run" in rival[0].stderr, rival[0].stderr
    assert "Traceback" not in rival[0].stderr
    assert snapshot(out) == before  # the rival changed nothing
    assert_pushed(hub, "tester/tiny", out, base=None)  # what was pushed is this one conversion
    assert not (out / C.LOCK_FILE).exists()

    holder = subprocess.Popen(  # another process writing the directory (as convert, eval or report do)
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from lplr_convert.io.outdir import "
         "OutputLock\nwith OutputLock.updating(Path(sys.argv[1])):\n print('locked', flush=True); time.sleep(60)",
         str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        requests = len(hub.requests)
        with pytest.raises(LplrError, match="being written by another run .*pid"):
            push(out, "tester/tiny")
        assert len(hub.requests) == requests
    finally:
        holder.kill()
        holder.wait()


def test_the_token_never_leaves_through_an_echoing_server_a_commit_message_or_a_file_name(tmp_path, hub, capfd):
    """A server whose error body echoes the request's headers: the error (and its --debug traceback) holds no token;
    a commit message, revision or file name holding the token is refused before anything is sent."""
    import traceback

    out = make_output_dir(tmp_path)
    handle = hub.handle

    def echoing(method, raw_path, headers, body):
        if method == "POST" and "/commit/" in raw_path:
            return 400, {"error": f"bad request; you sent Authorization: {headers.get('Authorization')}"}, {}
        return handle(method, raw_path, headers, body)

    hub.handle = echoing
    with pytest.raises(LplrError) as err:
        push(out, "tester/m")
    assert VALID_TOKEN not in "".join(traceback.format_exception(err.value)) and "<token>" in str(err.value)
    with pytest.raises(LplrError) as err:  # --debug: the traceback is printed, and holds no token
        run_cli("push", "--in-path", str(out), "--repo-id", "tester/m", "--debug")
    assert VALID_TOKEN not in "".join(traceback.format_exception(err.value))
    assert VALID_TOKEN not in capfd.readouterr().err
    hub.handle = handle
    n = len(hub.requests)
    for kw in ({"commit_message": f"pushed with {VALID_TOKEN}"}, {"revision": VALID_TOKEN}):
        with pytest.raises(LplrError, match="contains your Hub token") as err:
            push(out, "tester/m", **kw)
        assert VALID_TOKEN not in str(err.value)
    (out / f"notes-{VALID_TOKEN}.txt").write_text("hello")
    with pytest.raises(LplrError, match="file name .* contains your Hub token") as err:
        push(out, "tester/m")
    assert VALID_TOKEN not in str(err.value) and len(hub.requests) == n
