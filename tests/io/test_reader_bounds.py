"""The reader never reads outside its input: index entries, weight files, config.json and side files must resolve
inside the source directory (a Hugging Face cache snapshot may link into its own repository's blobs)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from lplr_testing import error_line, run_cli, tiny_checkpoint, tree_state

from lplr_convert import LplrError
from lplr_convert.io.reader import open_source
from lplr_convert.verify import verify

NAME = "model.layers.0.mlp.up_proj.weight"


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {NAME: torch.randn(16, 8, generator=g), "model.norm.weight": torch.ones(8)}


def _index(src: Path, shard: str) -> None:
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        NAME: shard, "model.norm.weight": shard}}))


def _escape(kind: str, src: Path, sibling: Path) -> list[str]:
    """Make `src` reach into `sibling` one way; returns what the error line must name."""
    outside = sibling / "model.safetensors"
    if kind == "index_dotdot":
        (src / "model.safetensors").unlink()
        _index(src, "../sibling/model.safetensors")
        return ["index", "../sibling/model.safetensors", "inside"]
    if kind == "index_absolute":
        (src / "model.safetensors").unlink()
        _index(src, str(outside))
        return ["index", str(outside), "inside"]
    if kind == "index_link":
        (src / "model.safetensors.index.json").symlink_to(sibling / "index.json")
        return ["the index", "link to", "outside the source"]
    if kind == "weight_link":
        (src / "model.safetensors").unlink()
        (src / "model.safetensors").symlink_to(outside)
        return ["weight file", "link to", str(outside)]
    if kind == "config_link":
        (src / "config.json").unlink()
        (src / "config.json").symlink_to(sibling / "config.json")
        return ["config.json", "link to", "outside the source"]
    if kind == "side_link":
        (src / "tokenizer.json").symlink_to(sibling / "secret.txt")
        return ["side file", "tokenizer.json", "secret.txt"]
    assert kind == "nested_side_link"
    (src / "sub").mkdir()
    (src / "sub" / "vocab.txt").symlink_to(sibling / "secret.txt")
    return ["side file", "sub/vocab.txt", "outside the source"]


KINDS = ["index_dotdot", "index_absolute", "index_link", "weight_link", "config_link", "side_link",
         "nested_side_link"]


@pytest.mark.parametrize("kind", KINDS)
def test_nothing_outside_the_source_is_read(tmp_path, kind):
    src = tiny_checkpoint(tmp_path / "src", _tensors(0))
    sibling = tiny_checkpoint(tmp_path / "sibling", _tensors(1), {"model_type": "gpt2"})
    (sibling / "secret.txt").write_text("not for the output")
    _index(sibling, "model.safetensors")
    (sibling / "model.safetensors.index.json").rename(sibling / "index.json")
    needles = _escape(kind, src, sibling)
    before = tree_state(src, sibling)
    out = tmp_path / "out"
    error_line(run_cli("--in-path", str(src), "--out-path", str(out), "--no-report"), *needles)
    error_line(run_cli("inspect", "--in-path", str(src)), *needles)
    assert tree_state(src, sibling) == before
    assert not out.exists()  # refused before the output directory is touched


def test_links_inside_the_source_are_followed(tmp_path):
    src = tiny_checkpoint(tmp_path / "src", _tensors())
    (src / "sub").mkdir()
    (src / "sub" / "tok.json").write_text("{}")
    (src / "tokenizer.json").symlink_to(src / "sub" / "tok.json")
    res = run_cli("--in-path", str(src), "--out-path", str(tmp_path / "out"), "--no-report")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out" / "tokenizer.json").read_text() == "{}"


def test_hugging_face_cache_snapshot_may_link_into_its_blobs(tmp_path):
    """snapshot_download's layout: snapshots/<commit>/<file> are links to ../../blobs/<hash>."""
    repo = tmp_path / "hub" / "models--owner--tiny"
    staging = tiny_checkpoint(tmp_path / "staging", _tensors())
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for f in staging.iterdir():
        blob = repo / "blobs" / f"blob-{f.name}"
        f.rename(blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    out = tmp_path / "out"
    res = run_cli("--in-path", str(snap), "--out-path", str(out), "--no-report")
    assert res.exit_code == 0, res.output
    assert verify(out, source=str(snap))["errors_checked"]
    # ... but not into another repository's blobs
    other = tmp_path / "hub" / "models--owner--other" / "blobs"
    other.mkdir(parents=True)
    (repo / "blobs" / "blob-config.json").rename(other / "config.json")
    (snap / "config.json").unlink()
    (snap / "config.json").symlink_to(other / "config.json")
    with pytest.raises(LplrError, match="outside the source directory"):
        open_source(str(snap))
