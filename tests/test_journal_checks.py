"""A hand-edited resume journal is checked against what it names (issue 24): a record renamed to another tensor, a
changed shard index, swapped temporary names, duplicated entries. The damaged part is redone (a warning names it)
and the finished output is byte-identical to an uninterrupted run; never a wrong tensor, a raw FileNotFoundError or
an output marked complete that a loader cannot read."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import signal
from pathlib import Path

import pytest
from lplr_testing import run_cli, run_cli_child

from lplr_convert import constants as C
from lplr_convert import load_state_dict
from lplr_convert.io.manifest import read_manifest


def _shards(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.glob("model-*.safetensors")}


@pytest.fixture(scope="module")
def interrupted(tiny_llama_dir, tmp_path_factory):
    """(args without --out-path, an uninterrupted output, an interrupted run's directory with >= 3 finished shards)."""
    base = tmp_path_factory.mktemp("journal")
    args = ["--in-path", str(tiny_llama_dir), "--max-shard-size", "30KB", "--seed", "3", "--no-report"]
    ref = base / "ref"
    assert run_cli(*args, "--out-path", str(ref)).exit_code == 0
    killed = base / "killed"
    proc = run_cli_child(*args, "--out-path", str(killed), KILL_AT="20")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert len(json.loads((killed / C.PROGRESS_FILE).read_text())["shards"]) >= 3
    return args, ref, killed


def _rename_record(j):  # a record renamed to a tensor of the same shape that is not yet done
    s = j["shards"][1]
    done = {g for sh in j["shards"] for g in sh["groups"]}
    rec = s["records"][-1]
    other = rec["name"].replace("layers.0", "layers.1") if "layers.0" in rec["name"] else None
    assert other and other not in done
    rec["name"] = other
    s["groups"][-1] = other


def _shard_index(j):
    j["shards"][1]["index"] = 7


def _record_shard(j):
    j["shards"][1]["records"][0]["shard"] = 3


def _swap_temp_names(j):  # the files' names and their hashes swapped together: both files are intact
    a, b = j["shards"][0], j["shards"][1]
    for k in ("temp_name", "sha256", "bytes"):
        a[k], b[k] = b[k], a[k]


def _duplicate_entry(j):
    j["shards"].append(copy.deepcopy(j["shards"][1]))


def _duplicate_record(j):
    j["shards"][2]["records"].insert(0, copy.deepcopy(j["shards"][1]["records"][0]))
    j["shards"][2]["groups"].insert(0, j["shards"][1]["groups"][0])


def _stored_shape(j):
    rec = next(r for r in j["shards"][1]["records"] if len(r["stored"]) > 1)
    meta = next(iter(rec["stored"].values()))
    meta["shape"] = [meta["shape"][0] + 1, *meta["shape"][1:]]


def _garbage(j):
    j["shards"][1]["records"] = [17]


@pytest.mark.parametrize("edit", [_rename_record, _shard_index, _record_shard, _swap_temp_names, _duplicate_entry,
                                  _duplicate_record, _stored_shape, _garbage])
def test_hand_edited_journal_is_redone_not_trusted(interrupted, tmp_path, edit):
    args, ref, killed = interrupted
    out = Path(shutil.copytree(killed, tmp_path / "out"))
    journal = json.loads((out / C.PROGRESS_FILE).read_text())
    edit(journal)
    (out / C.PROGRESS_FILE).write_text(json.dumps(journal))
    res = run_cli(*args, "--out-path", str(out), "--resume")
    assert res.exit_code == 0, res.output
    assert "cannot be kept" in res.stderr and "redoing it" in res.stderr, res.stderr
    assert _shards(out) == _shards(ref)
    strip = lambda m: [{k: v for k, v in r.items() if k != "seconds"} for r in m["tensors"]]
    assert strip(read_manifest(out)) == strip(read_manifest(ref))
    assert set(load_state_dict(out)) == set(load_state_dict(ref))


def test_untouched_journal_keeps_every_finished_shard(interrupted, tmp_path):
    args, ref, killed = interrupted
    out = Path(shutil.copytree(killed, tmp_path / "out"))
    res = run_cli(*args, "--out-path", str(out), "--resume")
    assert res.exit_code == 0 and "cannot be kept" not in res.stderr, res.output
    n = len(json.loads((killed / C.PROGRESS_FILE).read_text())["shards"])
    assert f"resuming: {n} finished shard(s) kept" in res.stderr
    assert _shards(out) == _shards(ref)
