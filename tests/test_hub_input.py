"""Hub input end to end: the real CLI converts `--in-path owner/name` downloaded by the real huggingface_hub client
from the loopback Hub-compatible server (tests/hub_server.py), exactly as it converts the same files locally."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hub_server import VALID_TOKEN, HubServer
from lplr_testing import run_cli
from safetensors.torch import load_file

from lplr_convert import constants as C
from lplr_convert.io.manifest import read_manifest
from lplr_convert.hf.loading import load_state_dict

REPO = "owner/tiny"
TOKENIZER_FILES = {  # tokenizer-ish files a real repo carries next to the weights (all downloaded and copied)
    "tokenizer.json": {"version": "1.0", "model": {"type": "WordLevel", "vocab": {f"t{i}": i for i in range(96)}}},
    "tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 64},
    "special_tokens_map.json": {"bos_token": "t0", "eos_token": "t1"},
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny_repo_dir(tmp_path_factory, tiny_llama_dir) -> Path:
    """A repo-shaped directory: tiny Llama shards + index + config, tokenizer files, a README, and a decoy
    pytorch_model.bin holding *different* weights, which must never be downloaded while safetensors exist."""
    root = tmp_path_factory.mktemp("tiny_repo") / "tiny"
    shutil.copytree(tiny_llama_dir, root)
    for name, content in TOKENIZER_FILES.items():
        (root / name).write_text(json.dumps(content, indent=2))
    (root / C.MODEL_CARD).write_text("---\nlicense: mit\n---\n\n# tiny\n")
    weights = {}
    for shard in sorted(root.glob("*.safetensors")):
        weights.update(load_file(shard))
    torch.save({k: (v.float() * 2).to(v.dtype) for k, v in weights.items()}, root / "pytorch_model.bin")
    return root


@pytest.fixture
def hub(tmp_path):
    with HubServer(tmp_path / "hub", tree_page_size=4) as server:  # small pages: the client must follow Link
        yield server
        assert server.errors == []


def files_of(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}


def cli_process(hub: HubServer, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """`lplr-convert ARGS` in a fresh process that talks to the loopback Hub only: HF_ENDPOINT, a fresh HF_HOME,
    a token, HF_HUB_OFFLINE unset, and no Xet opt-out (the server never advertises Xet, so the client cannot use it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf_home"), HF_TOKEN=VALID_TOKEN,
               HF_HUB_DISABLE_PROGRESS_BARS="1", NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    return subprocess.run([sys.executable, "-m", "lplr_convert.cli", *args], env=env, capture_output=True,
                          text=True, timeout=120, check=False)


def convert_local(src: Path, out: Path) -> Path:
    res = run_cli("--in-path", str(src), "--out-path", str(out), "--no-report", "--seed", "0")
    assert res.exit_code == 0, res.output
    return out


def snapshot_files(tmp_path: Path, repo_id: str) -> set[str]:
    snaps = list((tmp_path / "hf_home" / "hub" / f"models--{repo_id.replace('/', '--')}" / "snapshots").iterdir())
    assert len(snaps) == 1
    return set(files_of(snaps[0]))


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode != 0
    line = proc.stderr.strip()
    assert "\n" not in line and line.startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in line, line
    return line


def test_hub_repo_converts_exactly_like_its_local_files(hub, tiny_repo_dir, tmp_path):
    commit = hub.add_files(REPO, files_of(tiny_repo_dir), private=True)  # private: the token must reach the Hub
    out = tmp_path / "from_hub"
    proc = cli_process(hub, tmp_path, "--in-path", REPO, "--revision", "main", "--out-path", str(out),
                       "--no-report", "--seed", "0")
    assert proc.returncode == 0, proc.stderr

    manifest = read_manifest(out)
    assert manifest["complete"] is True
    src = manifest["source"]
    assert (src["repo_id"], src["revision"], src["path"]) == (REPO, "main", None)
    local = convert_local(tiny_repo_dir, tmp_path / "from_local")
    local_manifest = read_manifest(local)
    assert src["files"] == local_manifest["source"]["files"]  # the same source shards, by sha256
    assert src["kind"] == "safetensors" and all(f.endswith(".safetensors") for f in src["files"])

    # Same seed, same bytes: every shard and every copied file is identical to the local conversion's.
    hub_files, local_files = files_of(out), files_of(local)
    assert set(hub_files) == set(local_files)
    assert set(manifest["shards"]) and all(name in hub_files for name in manifest["shards"])
    for name in hub_files:
        if name != C.MANIFEST_FILE:
            assert hub_files[name].read_bytes() == local_files[name].read_bytes(), name
    assert set(TOKENIZER_FILES) | {C.MODEL_CARD, C.CONFIG_FILE} <= set(hub_files)
    strip = ("seconds",)
    assert ([{k: v for k, v in t.items() if k not in strip} for t in manifest["tensors"]]
            == [{k: v for k, v in t.items() if k not in strip} for t in local_manifest["tensors"]])
    assert any(t["method"] != "copy" for t in manifest["tensors"])  # something really was compressed

    dense, dense_local = load_state_dict(out), load_state_dict(local)
    assert dense.keys() == dense_local.keys()
    assert all(dense[k].dtype == dense_local[k].dtype and torch.equal(dense[k], dense_local[k]) for k in dense)

    # What went over the wire: safetensors + json + README through the real download protocol, never the .bin.
    bin_sha = sha256(tiny_repo_dir / "pytorch_model.bin")
    assert bin_sha not in hub.downloaded()
    assert not any(r.path.endswith(".bin") or bin_sha in r.path for r in hub.requests)
    shard_shas = {sha256(tiny_repo_dir / f) for f in src["files"]}
    assert shard_shas <= hub.downloaded()
    expected = set(files_of(tiny_repo_dir)) - {"pytorch_model.bin"}
    assert snapshot_files(tmp_path, REPO) == expected  # .gitattributes is not asked for either
    cdn = [r for r in hub.requests if r.path.startswith("/cdn/")]
    assert {r.path.rsplit("/", 1)[1] for r in cdn} == shard_shas  # LFS files came through the redirect ...
    assert all(r.host.startswith("localhost:") and not r.authorized and r.status == 200 for r in cdn)  # ... tokenless
    resolves = [r for r in hub.requests if "/resolve/" in r.path]
    assert resolves and all(r.authorized and f"/resolve/{commit.oid}/" in r.path for r in resolves)
    assert hub.count("GET", f"/api/models/{REPO}/tree/") >= 3  # the snapshot's listing: >= 3 pages of 4 entries
    assert manifest["source"]["commit"] == commit.oid  # the exact commit that was converted
    assert not any("xet" in r.path.lower() for r in hub.requests)


@pytest.mark.parametrize(("repo_id", "revision", "needles"), [
    (REPO, "no-such-branch", (REPO, "no-such-branch", "--revision")),
    ("owner/absent", None, ("owner/absent", "not found")),
])
def test_missing_revision_or_repo_is_a_one_line_error(hub, tmp_path, repo_id, revision, needles):
    hub.add_files(REPO, {"config.json": b'{"model_type": "llama"}', "model.safetensors": b"not reached"})
    out = tmp_path / "out"
    args = ["--in-path", repo_id, "--out-path", str(out), "--no-report"]
    proc = cli_process(hub, tmp_path, *args, *(["--revision", revision] if revision else []))
    assert_one_line_error(proc, *needles)
    assert not out.exists()
    assert hub.count(pattern="/resolve/") == 0 and hub.downloaded() == set()  # failed before any download


def test_bin_only_repo_is_converted_from_the_bin(hub, tiny_bert_bin_dir, tmp_path):
    hub.add_files("owner/tiny-bert", files_of(tiny_bert_bin_dir))
    out = tmp_path / "from_hub"
    proc = cli_process(hub, tmp_path, "--in-path", "owner/tiny-bert", "--out-path", str(out), "--no-report",
                       "--seed", "0")
    assert proc.returncode == 0, proc.stderr
    src = read_manifest(out)["source"]
    assert (src["repo_id"], src["revision"], src["kind"]) == ("owner/tiny-bert", None, "bin")
    assert list(src["files"]) == ["pytorch_model.bin"]
    assert sha256(tiny_bert_bin_dir / "pytorch_model.bin") in hub.downloaded()
    assert snapshot_files(tmp_path, "owner/tiny-bert") == {"config.json", "pytorch_model.bin"}

    local = convert_local(tiny_bert_bin_dir, tmp_path / "from_local")
    dense, dense_local = load_state_dict(out), load_state_dict(local)
    assert dense.keys() == dense_local.keys() and dense
    assert all(dense[k].dtype == dense_local[k].dtype and torch.equal(dense[k], dense_local[k]) for k in dense)
    assert {p: (out / p).read_bytes() for p in read_manifest(out)["shards"]} == \
        {p: (local / p).read_bytes() for p in read_manifest(local)["shards"]}
