"""Crash safety and resume, verify, and a clear one-line answer to every bad input."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lplr_testing import error_line, run_cli, tiny_checkpoint
from safetensors.torch import save_file

from lplr_convert import IncompleteOutputError, LplrError, load_state_dict
from lplr_convert import constants as C
from lplr_convert.io.manifest import read_manifest

ROOT = Path(__file__).resolve().parents[1]

# Runs the real CLI in a child process that SIGKILLs itself at a chosen point.
_KILLER = r"""
import os, signal, sys
import lplr_convert.pipeline.convert as conv
from lplr_convert.io import writer
where, n = os.environ["KILL_WHERE"], int(os.environ["KILL_AT"])
count = [0]
def hit():
    count[0] += 1
    if count[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)
if where == "add_group":  # mid-shard, before the n-th tensor is written
    orig = writer.ShardWriter.add_group
    def add_group(self, *a, **k):
        hit()
        return orig(self, *a, **k)
    writer.ShardWriter.add_group = add_group
elif where == "close":  # a shard is complete on disk but the journal does not know it yet
    orig_close = conv.Journal.on_close
    def on_close(self, shard):
        hit()
        return orig_close(self, shard)
    conv.Journal.on_close = on_close
elif where == "manifest":  # everything is written except the manifest
    orig_w = conv.write_json_atomic
    def w(path, *a, **k):
        if str(path).endswith("lplr_manifest.json"):
            hit()
        return orig_w(path, *a, **k)
    conv.write_json_atomic = w
from lplr_convert.cli import main
sys.argv = ["lplr-convert", *sys.argv[1:]]
main()
"""


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _run(args, kill=None, limit_bytes=None):
    env = dict(os.environ, LOGURU_LEVEL="WARNING")
    if kill:
        env["KILL_WHERE"], env["KILL_AT"] = kill[0], str(kill[1])
        cmd = [sys.executable, "-c", _KILLER, *args]
    else:
        env["KILL_WHERE"], env["KILL_AT"] = "none", "0"
        cmd = [sys.executable, "-c", _KILLER, *args]

    def limit():
        if limit_bytes is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run(cmd, env=env, check=False, capture_output=True, text=True, timeout=300, preexec_fn=limit)


def _outputs(out: Path) -> dict[str, str]:
    return {p.name: _sha(p) for p in out.iterdir() if p.name.startswith("model") and p.is_file()}


def _records(out: Path):
    m = read_manifest(out)
    return [{k: v for k, v in r.items() if k != "seconds"} for r in m["tensors"]], m["shards"]


@pytest.fixture(scope="module")
def reference_run(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    args = ["--in-path", str(tiny_llama_dir), "--out-path", str(out), "--max-shard-size", "30KB", "--seed", "3",
            "--no-report"]
    proc = _run(args)
    assert proc.returncode == 0, proc.stderr
    assert len(read_manifest(out)["shards"]) >= 4
    return args, out


def test_sigkill_at_several_points_then_resume_is_byte_identical(reference_run, tmp_path):
    args, ref = reference_run
    out = tmp_path / "out"
    args = [a if a != str(ref) else str(out) for a in args]
    kills = [("add_group", 3), ("close", 2), ("add_group", 4), ("manifest", 1)]
    for i, kill in enumerate(kills):
        proc = _run(args + (["--resume"] if i else []), kill=kill)
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        with pytest.raises(IncompleteOutputError, match="--resume"):
            read_manifest(out)
        with pytest.raises(LplrError):
            load_state_dict(out)
    proc = _run(args + ["--resume"])
    assert proc.returncode == 0, proc.stderr
    assert _outputs(out) == _outputs(ref)
    assert _records(out) == _records(ref)
    assert not (out / C.PROGRESS_FILE).exists()
    assert not [p for p in out.iterdir() if p.name.endswith((C.PARTIAL_SUFFIX, C.DATA_SUFFIX))]


def test_resume_refuses_changed_setting(reference_run, tmp_path):
    args, ref = reference_run
    out = tmp_path / "out"
    args = [a if a != str(ref) else str(out) for a in args]
    assert _run(args, kill=("add_group", 5)).returncode == -signal.SIGKILL
    res = run_cli(*args, "--resume", "--b1", "4")
    assert res.exit_code == 1
    assert "--b1 changed" in res.stderr and "Traceback" not in res.output


def test_resume_names_the_changed_input_not_a_setting_derived_from_it(tiny_llama_dir, tmp_path):
    """A recipe edited between the kill and --resume was reported as '--rank changed' (a flag never passed), and a
    changed config.json as two identical 80-character prefixes; the message now names the file and the difference,
    and nothing in the source or the output is changed."""
    from lplr_testing import tree_state as states

    from lplr_convert.verify import verify

    def tree_state(*roots):  # the lock file names its last holder (the refused run); everything else must stay
        return {k: v for k, v in states(*roots).items() if not k.endswith(C.LOCK_FILE)}

    src = Path(shutil.copytree(tiny_llama_dir, tmp_path / "src"))
    recipe, out = tmp_path / "recipe.yaml", tmp_path / "out"
    recipe.write_text("defaults: {method: lplr, rank_fraction: 0.5}\n")
    config = (src / "config.json").read_text()
    args = ["--in-path", str(src), "--out-path", str(out), "--max-shard-size", "30KB", "--recipe", str(recipe),
            "--no-report"]
    assert _run(args, kill=("close", 2)).returncode == -signal.SIGKILL
    recipe.write_text("defaults: {method: lplr, rank_fraction: 0.6}\n")
    before = tree_state(src, out)
    line = error_line(run_cli(*args, "--resume"), "--recipe changed", "line 1", "rank_fraction: 0.5",
                      "rank_fraction: 0.6", "--overwrite")
    assert "--rank " not in line and tree_state(src, out) == before
    recipe.write_text("defaults: {method: lplr, rank_fraction: 0.5}\n")
    (src / "config.json").write_text(config.replace('"llama"', '"mistral"'))
    before = tree_state(src, out)
    error_line(run_cli(*args, "--resume"), "config.json changed", "model_type: llama -> mistral")
    assert tree_state(src, out) == before
    (src / "config.json").write_text(config)
    assert run_cli(*args, "--resume").exit_code == 0
    verify(out, source=str(src))


def test_disk_full_mid_run_leaves_clearly_incomplete_output_then_resumes(reference_run, tmp_path):
    args, ref = reference_run
    out = tmp_path / "out"
    args = [a if a != str(ref) else str(out) for a in args]
    proc = _run(args, limit_bytes=45_000)  # writes beyond 45 kB fail like a full disk
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "--resume" in last and "Traceback" not in proc.stderr
    assert not (out / C.MANIFEST_FILE).exists()
    with pytest.raises(IncompleteOutputError):
        read_manifest(out)
    assert _run(args + ["--resume"]).returncode == 0
    assert _outputs(out) == _outputs(ref)


def test_verify_catches_one_flipped_byte_anywhere(reference_run, tmp_path, tiny_llama_dir):
    _, ref = reference_run
    res = run_cli("verify", "--in-path", str(ref), "--source", str(tiny_llama_dir))
    assert res.exit_code == 0, res.output
    assert "errors recomputed" in res.output
    manifest = read_manifest(ref)
    for shard in manifest["shards"]:
        size = (ref / shard).stat().st_size
        for offset in (3, size // 2, size - 1):  # header length, data, last byte
            bad = tmp_path / f"bad_{shard}_{offset}"
            shutil.copytree(ref, bad)
            with open(bad / shard, "r+b") as f:
                f.seek(offset)
                b = f.read(1)
                f.seek(offset)
                f.write(bytes([b[0] ^ 0x01]))
            res = run_cli("verify", "--in-path", str(bad))
            assert res.exit_code == 1
            assert shard in res.stderr and "Traceback" not in res.output
            shutil.rmtree(bad)


_ckpt = tiny_checkpoint


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"model.layers.0.mlp.up_proj.weight": torch.randn(32, 16, generator=g),
            "model.layers.0.input_layernorm.weight": torch.ones(16)}


_bad = error_line  # one-line error naming the problem, non-zero exit, no traceback


def test_bad_inputs_get_one_line_errors(tmp_path):
    good = _ckpt(tmp_path / "good", _weights())
    out = tmp_path / "out"
    conv = functools.partial(run_cli, "--no-report")
    _bad(run_cli("--in-path", str(tmp_path / "nope"), "--out-path", str(out)), "does not exist")
    (tmp_path / "empty").mkdir()
    _bad(run_cli("--in-path", str(tmp_path / "empty"), "--out-path", str(out)), "holds no weights")
    # truncated file
    trunc = shutil.copytree(good, tmp_path / "trunc")
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[:-10])
    _bad(conv("--in-path", str(trunc), "--out-path", str(out)), "model.safetensors", "truncated")
    # a header whose offsets lie
    lie = shutil.copytree(good, tmp_path / "lie")
    raw = (lie / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = raw[8:8 + n].replace(b'"data_offsets":[0,', b'"data_offsets":[4,')
    (lie / "model.safetensors").write_bytes(raw[:8] + header + raw[8 + n:])
    _bad(conv("--in-path", str(lie), "--out-path", str(out)), "model.safetensors")
    # an index naming a missing shard
    idx = shutil.copytree(good, tmp_path / "idx")
    (idx / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"a": "model-00002-of-00002.safetensors"}}))
    _bad(conv("--in-path", str(idx), "--out-path", str(out)), "model-00002-of-00002.safetensors", "missing")
    # rank policies outside 1..min(m, n), bits outside the allowed set
    _bad(conv("--in-path", str(good), "--out-path", str(out), "--rho", "0.01"), "rank 0")
    _bad(conv("--in-path", str(good), "--out-path", str(out), "--rank", "17"), "outside 1..16")
    _bad(conv("--in-path", str(good), "--out-path", str(out), "--b1", "9"), "--b1 9", "16")
    _bad(conv("--in-path", str(good), "--out-path", str(out), "--rank", "2", "--rho", "0.5"), "one rank policy")
    _bad(conv("--in-path", str(good), "--out-path", str(out), "--method", "rtn", "--quantizer", "group"),
         "--group-size")
    # out-path equal to / inside the input, or non-empty without --overwrite/--resume
    _bad(conv("--in-path", str(good), "--out-path", str(good)), "inside the input")
    _bad(conv("--in-path", str(good), "--out-path", str(good / "sub")), "inside the input")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    _bad(conv("--in-path", str(good), "--out-path", str(tmp_path / "busy")), "not empty", "--overwrite")
    _bad(conv("--in-path", str(good), "--out-path", str(tmp_path / "busy"), "--overwrite"), "not an lplr-convert")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"  # never deleted
    assert not out.exists() or not (out / C.MANIFEST_FILE).exists()
    # loader and verify refuse what is not a finished conversion
    with pytest.raises(LplrError, match="no lplr_manifest.json"):
        load_state_dict(good)
    _bad(run_cli("verify", "--in-path", str(tmp_path / "busy")), C.MANIFEST_FILE)


def test_nonfinite_weight_is_named_or_copied(tmp_path):
    w = _weights()
    w["model.layers.0.mlp.up_proj.weight"][3, 4] = float("nan")
    src = _ckpt(tmp_path / "nan", w)
    _bad(run_cli("--in-path", str(src), "--out-path", str(tmp_path / "o1"), "--no-report"),
         "model.layers.0.mlp.up_proj.weight", "--on-nonfinite copy")
    res = run_cli("--in-path", str(src), "--out-path", str(tmp_path / "o2"), "--no-report", "--on-nonfinite", "copy")
    assert res.exit_code == 0, res.output
    rec = {r["name"]: r for r in read_manifest(tmp_path / "o2")["tensors"]}["model.layers.0.mlp.up_proj.weight"]
    assert rec["method"] == "copy" and rec["nonfinite"]
    got = load_state_dict(tmp_path / "o2")["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(got.nan_to_num(), w["model.layers.0.mlp.up_proj.weight"].nan_to_num())


def test_zero_size_tensor_is_copied(tmp_path):
    w = _weights()
    w["model.layers.0.mlp.down_proj.weight"] = torch.zeros(0, 16)
    src = _ckpt(tmp_path / "zero", w)
    res = run_cli("--in-path", str(src), "--out-path", str(tmp_path / "o"), "--no-report")
    assert res.exit_code == 0, res.output
    got = load_state_dict(tmp_path / "o")
    assert got["model.layers.0.mlp.down_proj.weight"].shape == (0, 16)
    rec = {r["name"]: r for r in read_manifest(tmp_path / "o")["tensors"]}
    assert rec["model.layers.0.mlp.down_proj.weight"]["method"] == "copy"
    assert rec["model.layers.0.mlp.up_proj.weight"]["method"] == "lplr"


def test_source_shrinking_during_the_run_is_a_clear_error(tmp_path):
    """The header is validated when the source is opened; a file cut short afterwards fails on the read, naming it."""
    from lplr_convert.io.reader import open_source

    src = _ckpt(tmp_path / "src", _weights())
    source = open_source(str(src))
    target = src / "model.safetensors"
    with open(target, "r+b") as f:
        f.truncate(target.stat().st_size - 8)
    with pytest.raises(LplrError, match=r"model\.safetensors .*ends early"):
        list(source.iter_tensors())


def test_reader_returns_the_stored_tensors_exactly(tmp_path):
    """Positioned reads at the validated offsets give exactly what safetensors' own loader gives, every dtype."""
    from safetensors.torch import load_file

    from lplr_convert.io.reader import open_source

    gen = torch.Generator().manual_seed(3)
    w = {f"t.{d}": (torch.randn(5, 7, generator=gen) * 100).to(d) for d in
         (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int64)}
    w["t.bool"], w["t.empty"], w["t.scalar"] = torch.tensor([True, False, True]), torch.zeros(0, 3), torch.tensor(2.5)
    (tmp_path / "s").mkdir()
    save_file(w, tmp_path / "s" / "model.safetensors")
    got = dict(open_source(str(tmp_path / "s")).iter_tensors())
    ref = load_file(tmp_path / "s" / "model.safetensors")
    assert got.keys() == ref.keys()
    for k in ref:
        assert got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]), k


class _NotATensor:
    pass


def test_bin_with_more_than_tensors_is_refused(tmp_path):
    src = tmp_path / "evil"
    src.mkdir()
    torch.save({"w": torch.zeros(4, 4), "payload": functools.partial(print, "pwned")}, src / "pytorch_model.bin")
    res = run_cli("--in-path", str(src), "--out-path", str(tmp_path / "o"), "--no-report")
    _bad(res, "weights_only", "safetensors")
    assert "pwned" not in res.output


def test_debug_shows_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lplr_convert.cli", "--in-path", str(tmp_path / "nope"),
                           "--out-path", str(tmp_path / "o"), "--debug"], check=False, capture_output=True,
                          text=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_unreadable_file(tmp_path, monkeypatch):
    src = _ckpt(tmp_path / "src", _weights())
    target = src / "model.safetensors"
    os.chmod(target, 0o000)
    if os.access(target, os.R_OK):  # root reads anything: make open() answer as the kernel would (EACCES)
        import builtins

        real_open = builtins.open

        def deny(file, *a, **k):
            if str(file) == str(target):
                raise PermissionError(13, "Permission denied", str(file))
            return real_open(file, *a, **k)

        monkeypatch.setattr(builtins, "open", deny)
    line = _bad(run_cli("--in-path", str(src), "--out-path", str(tmp_path / "o"), "--no-report"),
                "model.safetensors")
    assert "permission" in line.lower()


@pytest.fixture(scope="module")
def clean_output(reference_run):
    _, ref = reference_run
    return ref, load_state_dict(ref)


_MUTATIONS = st.tuples(st.sampled_from(["flip", "truncate", "delete", "append", "json"]),
                       st.integers(min_value=0, max_value=10**9), st.integers(min_value=0, max_value=255))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutation=_MUTATIONS, which=st.integers(min_value=0, max_value=10**6))
def test_mutated_outputs_load_exactly_or_fail_clearly(clean_output, tmp_path_factory, mutation, which):
    ref, clean = clean_output
    d = tmp_path_factory.mktemp("mut") / "out"
    shutil.copytree(ref, d)
    files = sorted([p for p in d.iterdir() if p.name.startswith("model-")] + [d / C.MANIFEST_FILE])
    target = files[which % len(files)]
    kind, pos, byte = mutation
    data = bytearray(target.read_bytes())
    if kind == "flip":
        i = pos % len(data)
        data[i] ^= (byte or 1)
        target.write_bytes(bytes(data))
    elif kind == "truncate":
        target.write_bytes(bytes(data[: pos % len(data)]))
    elif kind == "delete":
        target.unlink()
    elif kind == "append":
        target.write_bytes(bytes(data) + bytes([byte]) * (1 + pos % 7))
    else:  # a valid-JSON edit of the manifest
        m = json.loads((d / C.MANIFEST_FILE).read_text())
        rec = m["tensors"][pos % len(m["tensors"])]
        key = sorted(rec)[byte % len(rec)]
        rec[key] = None if not isinstance(rec[key], bool) else not rec[key]
        (d / C.MANIFEST_FILE).write_text(json.dumps(m))
    try:
        got = load_state_dict(d)
    except LplrError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert got.keys() == clean.keys()
    for k in clean:
        assert got[k].dtype == clean[k].dtype and torch.equal(got[k], clean[k])


def test_hub_repo_id_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = _bad(run_cli("--in-path", "some-owner/some-model", "--out-path", str(tmp_path / "o"), "--no-report"),
                "some-owner/some-model")
    assert "Hub" in line and "local directory" in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), None])
def test_finiteness_check_matches_isfinite(dtype, bad):
    from lplr_convert.pipeline.task import _all_finite

    t = torch.randn(37, 23).to(dtype)
    if bad is not None:
        t[11, 5] = bad
    assert _all_finite(t) == bool(torch.isfinite(t).all())
    assert _all_finite(torch.zeros(0, 4, dtype=dtype)) and _all_finite(torch.arange(5))
