"""Output-directory policy: every path check before any deletion, --overwrite deletes only what an earlier output of
this tool lists, --resume only continues an interrupted run, and one run at a time holds an output directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from lplr_testing import error_line, run_cli, tiny_checkpoint, tree_state

from lplr_convert import constants as C
from lplr_convert.io.outdir import OutputLock, clear_listed
from lplr_convert.verify import verify


@pytest.fixture(scope="module")
def converted_once(tmp_path_factory):
    base = tmp_path_factory.mktemp("outdir")
    g = torch.Generator().manual_seed(0)
    src = tiny_checkpoint(base / "src", {"model.layers.0.mlp.up_proj.weight": torch.randn(16, 8, generator=g),
                                         "model.norm.weight": torch.ones(8)})
    (src / "tokenizer.json").write_text("{}")
    out = base / "conv"
    res = run_cli("--in-path", str(src), "--out-path", str(out), "--no-report")
    assert res.exit_code == 0, res.output
    return src, out


@pytest.fixture
def world(converted_once, tmp_path):
    """A fresh copy of (source, its conversion) beside a sibling directory of the user's own files."""
    src, out = (shutil.copytree(p, tmp_path / p.name, symlinks=True) for p in converted_once)
    sibling = tmp_path / "sibling"
    sibling.mkdir()
    (sibling / "notes.txt").write_text("mine")
    return src, out, sibling


def _refused(args, protect, *needles) -> str:
    before = tree_state(*protect)
    line = error_line(run_cli(*args), *needles)
    assert tree_state(*protect) == before
    return line


def test_decompress_never_writes_into_or_over_its_input(world, tmp_path):
    src, conv, sibling = world
    base = ["decompress", "--in-path", str(conv), "--overwrite"]
    protect = (src, conv, sibling)
    _refused([*base, "--out-path", str(conv)], protect, "inside the input")
    _refused([*base, "--out-path", str(tmp_path)], protect, "contains the input")  # the parent of the input
    _refused([*base, "--out-path", str(conv / "dense")], protect, "inside the input")
    assert not (conv / "dense").exists()


def test_convert_never_writes_into_or_over_its_input(world, tmp_path):
    src, conv, sibling = world
    protect = (src, conv, sibling)
    for out in (src, src / "sub", tmp_path):
        _refused(["--in-path", str(src), "--out-path", str(out), "--overwrite", "--no-report"], protect, "the input")


def test_overwrite_deletes_only_what_an_earlier_output_lists(world):
    src, conv, sibling = world
    args = ["--in-path", str(src), "--out-path", str(conv), "--overwrite", "--no-report"]
    (conv / "my_notes.txt").write_text("keep me")
    _refused(args, (src, conv, sibling), "my_notes.txt", "will not delete")
    (conv / "my_notes.txt").unlink()
    before = tree_state(src, sibling)
    res = run_cli(*args)
    assert res.exit_code == 0, res.output
    assert tree_state(src, sibling) == before
    verify(conv)


def test_overwrite_refuses_a_directory_with_only_a_junk_manifest(world, tmp_path):
    src, _, sibling = world
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / C.MANIFEST_FILE).write_text("{junk")
    (foreign / "thesis.tex").write_text("years of work")
    protect = (src, foreign, sibling)
    _refused(["--in-path", str(src), "--out-path", str(foreign), "--overwrite"], protect, "not an lplr-convert output")
    _refused(["--in-path", str(src), "--out-path", str(foreign), "--resume"], protect,
             "not an interrupted lplr-convert run")


def test_resume_refuses_finished_outputs_and_foreign_files(world, tmp_path):
    src, conv, sibling = world
    _refused(["--in-path", str(src), "--out-path", str(conv), "--resume"], (src, conv, sibling),
             "already holds a finished conversion", "--overwrite")
    run = tmp_path / "run"  # an interrupted run's journal beside a file of the user's
    run.mkdir()
    (run / C.PROGRESS_FILE).write_text('{"fingerprint": {}, "shards": [], "files": []}')
    (run / "holiday.jpg").write_bytes(b"\xff\xd8")
    _refused(["--in-path", str(src), "--out-path", str(run), "--resume"], (src, run, sibling), "cannot resume",
             "holiday.jpg")


def test_overwrite_through_a_symlink_is_refused(world, tmp_path):
    src, conv, sibling = world
    link = tmp_path / "link"
    link.symlink_to(conv)
    _refused(["--in-path", str(src), "--out-path", str(link), "--overwrite"], (src, conv, sibling),
             "symbolic link", str(conv))


def test_a_held_lock_refuses_a_second_run_naming_the_holder(world, tmp_path):
    src, conv, sibling = world
    dense = tmp_path / "dense"
    with OutputLock(conv), OutputLock(dense):
        for args in (["--in-path", str(src), "--out-path", str(conv), "--overwrite"],
                     ["decompress", "--in-path", str(conv), "--out-path", str(dense), "--overwrite"]):
            line = _refused(args, (src, conv, dense, sibling), "being written by another run")
            assert f"pid {os.getpid()}" in line
    run_cli("--in-path", str(src), "--out-path", str(conv), "--overwrite", "--no-report")
    assert not (conv / C.LOCK_FILE).exists()  # a finished output carries no lock file


# A conversion that, once its journal is written (and the lock held), announces itself and waits for a go-ahead.
_PAUSED = r"""
import os, sys, time
from pathlib import Path
import lplr_convert.pipeline.convert as conv
ready, go = Path(os.environ["READY"]), Path(os.environ["GO"])
orig = conv._Run.compress_all
def compress_all(self):
    ready.write_text(str(os.getpid()))
    deadline = time.monotonic() + 120
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return orig(self)
conv._Run.compress_all = compress_all
from lplr_convert.cli import main
sys.argv = ["lplr-convert", *sys.argv[1:]]
main()
"""


def test_two_processes_on_one_output_one_wins(world, tmp_path):
    src, _, sibling = world
    out = tmp_path / "out"
    args = ["--in-path", str(src), "--out-path", str(out), "--no-report"]
    env = dict(os.environ, LOGURU_LEVEL="WARNING", READY=str(tmp_path / "ready"), GO=str(tmp_path / "go"))
    first = subprocess.Popen([sys.executable, "-c", _PAUSED, *args], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "ready").exists():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.02)
        assert (out / C.PROGRESS_FILE).is_file()  # the first run is under way
        before = tree_state(src, out, sibling)
        for extra in ("--overwrite", "--resume"):
            second = subprocess.run([sys.executable, "-m", "lplr_convert.cli", *args, extra], env=env,
                                    capture_output=True, text=True, timeout=120, check=False)
            assert second.returncode == 1
            lines = [ln for ln in second.stderr.splitlines() if ln.startswith("error:")]
            assert len(lines) == 1 and "being written by another run" in lines[0], second.stderr
            assert f"pid {first.pid}" in lines[0]
            assert tree_state(src, out, sibling) == before
        (tmp_path / "go").write_text("")
        stdout, stderr = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, stderr
    assert "wrote" in stdout
    assert verify(out, source=str(src))["errors_checked"]
    assert not (out / C.LOCK_FILE).exists()


def _crafted_records(out, sibling):
    """Records of each kind this tool trusts for --overwrite, naming files outside `out` (relative and absolute)."""
    outside = ["../" + sibling.name + "/notes.txt", str(sibling / "notes.txt")]
    journal = {"fingerprint": {}, "shards": [{"temp_name": outside[0]}], "files": outside}
    return {"journal": (C.PROGRESS_FILE, journal), "export record": (C.EXPORT_FILE, {"files": outside}),
            "decompress index": (C.SAFE_INDEX, {"weight_map": {"w": outside[0]}})}


@pytest.mark.parametrize("kind", ["journal", "export record", "decompress index"])
@pytest.mark.parametrize("command", ["convert", "decompress"])
def test_overwrite_never_follows_a_record_out_of_the_output(world, tmp_path, kind, command):
    """A record naming `../sibling/notes.txt` or an absolute path is not one this tool wrote: --overwrite refuses the
    directory, and nothing outside it (nor in it) is deleted."""
    src, conv, sibling = world
    out = tmp_path / "crafted"
    out.mkdir()
    name, doc = _crafted_records(out, sibling)[kind]
    (out / name).write_text(json.dumps(doc))
    args = (["--in-path", str(src), "--out-path", str(out), "--overwrite", "--no-report"] if command == "convert"
            else ["decompress", "--in-path", str(conv), "--out-path", str(out), "--overwrite"])
    _refused(args, (src, conv, out, sibling), str(out), "will not delete")


def test_a_manifest_listing_a_file_outside_its_directory_is_refused(world):
    src, conv, sibling = world
    doc = json.loads((conv / C.MANIFEST_FILE).read_text())
    doc[C.M_FILES]["../" + sibling.name + "/notes.txt"] = {"sha256": "0" * 64, "bytes": 4}  # not under the integrity
    (conv / C.MANIFEST_FILE).write_text(json.dumps(doc))
    protect = (src, conv, sibling)
    _refused(["--in-path", str(src), "--out-path", str(conv), "--overwrite", "--no-report"], protect,
             "not an lplr-convert output")
    for args in (["verify", "--in-path", str(conv)], ["decompress", "--in-path", str(conv), "--out-path",
                                                       str(sibling.parent / "dense")]):
        _refused(args, protect, "not a plain file name inside")


def test_clear_listed_deletes_only_entries_inside_the_output(tmp_path):
    out, sibling = tmp_path / "out", tmp_path / "sibling"
    out.mkdir()
    sibling.mkdir()
    (out / "a.txt").write_text("ours")
    (sibling / "b.txt").write_text("theirs")
    (out / "link").symlink_to(sibling)  # a link is removed, never followed
    clear_listed(out, {"a.txt", "link", "../sibling/b.txt", str(sibling / "b.txt"), "link/b.txt"}, "a test record")
    assert not out.exists() or not any(out.iterdir())
    assert (sibling / "b.txt").read_text() == "theirs"


def test_an_output_path_below_a_file_is_named(world, tmp_path):
    src, conv, sibling = world
    target = str(sibling / "notes.txt" / "out")
    for args in (["--in-path", str(src), "--out-path", target, "--no-report"],
                 ["decompress", "--in-path", str(conv), "--out-path", target]):
        _refused(args, (src, conv, sibling), "cannot be created", "Not a directory")


def test_eval_and_report_wait_for_no_one_while_another_run_holds_the_output(world, tmp_path):
    """eval rewrites the manifest and the report, report rewrites the report: both hold the output's lock. Without it,
    an eval that finished after a `convert --overwrite` of the same directory wrote the old manifest over the new
    conversion (measured: exit 0 for both, then verify failed on 218 problems)."""
    src, conv, sibling = world
    with OutputLock(conv):
        for args in (["eval", "--original", str(src), "--converted", str(conv)], ["report", "--in-path", str(conv)]):
            _refused(args, (src, conv, sibling), "being written by another run", f"pid {os.getpid()}")
    res = run_cli("report", "--in-path", str(conv))
    assert res.exit_code == 0, res.output
    assert not (conv / C.LOCK_FILE).exists()
    verify(conv)


def test_no_output_is_written_inside_another_output_of_the_tool(world, tmp_path):
    """`convert --out-path conv/nested` exited 0 and the nested conversion joined `conv` (verify still passed, and a
    push of conv listed nested/lplr_manifest.json for upload). Every writing command now refuses a directory inside
    any output of this tool, before creating anything."""
    src, conv, sibling = world
    dense = tmp_path / "dense"
    assert run_cli("decompress", "--in-path", str(conv), "--out-path", str(dense)).exit_code == 0
    for out, args in ((conv / "nested", ["--in-path", str(src), "--no-report"]),
                      (dense / "nested", ["decompress", "--in-path", str(conv)])):
        _refused([*args, "--out-path", str(out)], (src, conv, dense, sibling), str(out),
                 "an output directory of lplr-convert")
        assert not out.exists()


def test_the_lock_is_taken_on_the_file_that_is_there(tmp_path, monkeypatch):
    """A run that finishes removes its lock file. If that happens between another run's open() and flock(), the
    second would hold a lock on a deleted file while a third locks a new one; the lock now checks that its descriptor
    is the file at the path, and retries otherwise."""
    import fcntl

    from lplr_convert.io import outdir

    out = tmp_path / "out"
    out.mkdir()
    path = out / C.LOCK_FILE
    path.write_text("pid 1 on elsewhere")
    real, calls = fcntl.flock, []

    def flock(fd, op):
        if not calls:  # the holder finishes and a third run creates the file anew, before our flock
            path.unlink()
            path.write_text("")
        calls.append(fd)
        return real(fd, op)

    monkeypatch.setattr(outdir.fcntl, "flock", flock)
    with OutputLock(out) as lock:
        assert len(calls) == 2 and os.fstat(lock._fd).st_ino == os.stat(path).st_ino
        assert path.read_text() == f"pid {os.getpid()} on {os.uname().nodename}"


def test_a_run_that_fails_having_written_nothing_leaves_nothing(world, tmp_path):
    """A failure after the lock is taken (here: --calibration names no STATS) leaves neither the lock file nor the
    directory the run made; an existing directory stays, empty; one the failed run wrote into keeps the lock file."""
    src, _, sibling = world
    before = tree_state(tmp_path)
    out = tmp_path / "new"
    error_line(run_cli("--in-path", str(src), "--out-path", str(out), "--no-report", "--calibration", str(sibling)),
               "no lplr_calibration.json")
    assert not out.exists() and tree_state(tmp_path) == before
    existing = tmp_path / "empty"
    existing.mkdir()
    error_line(run_cli("--in-path", str(src), "--out-path", str(existing), "--no-report", "--calibration",
                       str(sibling)), "no lplr_calibration.json")
    assert existing.is_dir() and not any(existing.iterdir())
    lock = OutputLock(existing)
    with pytest.raises(RuntimeError), lock:
        (existing / "partial.safetensors").write_bytes(b"x")
        raise RuntimeError("killed mid-write")
    assert sorted(p.name for p in existing.iterdir()) == [C.LOCK_FILE, "partial.safetensors"]


def test_the_lock_survives_a_failed_holder_note_and_a_vanished_directory(tmp_path, monkeypatch):
    """Writing the holder's name into the lock file may fail (a full disk): the lock is still held, and released on
    exit. A run that failed having written nothing may remove the directory between another run's mkdir and open:
    the other run makes it again and takes the lock."""
    import errno as errno_

    from lplr_convert.io import outdir

    out = tmp_path / "out"

    def full(*a):
        raise OSError(errno_.ENOSPC, "No space left on device")

    monkeypatch.setattr(outdir.os, "pwrite", full)
    with OutputLock(out) as lock:
        with pytest.raises(Exception, match="being written by another run"), OutputLock(out):
            pass
        fd = lock._fd
    with pytest.raises(OSError):
        os.fstat(fd)  # closed on exit
    monkeypatch.undo()
    real_open, calls = os.open, []

    def open_(path, *a, **kw):
        if str(path).endswith(C.LOCK_FILE):
            if not calls:  # the other run's cleanup wins the race once
                shutil.rmtree(out)
            calls.append(path)
        return real_open(path, *a, **kw)

    monkeypatch.setattr(outdir.os, "open", open_)
    with OutputLock(out) as lock:
        assert len(calls) == 2 and (out / C.LOCK_FILE).is_file()
