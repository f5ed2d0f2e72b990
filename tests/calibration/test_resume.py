"""calibrate --resume: a run killed with SIGKILL and resumed writes the bytes of an uninterrupted run; what it cannot
continue is refused in one line naming the difference and the fix."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from lplr_testing import error_line, run_cli
from lplr_testing import tree_state as states

from lplr_convert import constants as C
from lplr_convert.calibration import load_calibration
from lplr_convert.errors import LplrError

# The real CLI in a child process that SIGKILLs itself at the KILL_AT-th pass of a point of the run.
_KILLER = r"""
import os, signal, sys
from lplr_convert.calibration import resume, run
where, n = os.environ["KILL_WHERE"], int(os.environ["KILL_AT"])
module, name, after = {
    "stats": (run, "save_block", False),  # before a block's statistics file is written
    "checkpoint": (resume, "write_tensors_atomic", True),  # statistics file and hidden states written, journal not
    "manifest": (run, "write_manifest", False),  # every block journaled, no manifest
}[where]
orig, count = getattr(module, name), [0]
def hooked(*a, **k):
    result = orig(*a, **k) if after else None
    count[0] += 1
    if count[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)
    return result if after else orig(*a, **k)
setattr(module, name, hooked)
from lplr_convert.cli import main
sys.argv = ["lplr-convert", "calibrate", *sys.argv[1:]]
main()
"""


def _args(src: Path, out: Path, text: Path, *extra: str) -> list[str]:
    return ["--in-path", str(src), "--out-path", str(out), "--text", str(text), "--samples", "6", "--seq-len", "40",
            "--batch-size", "4", *extra]


def _killed(args: list[str], where: str, at: int) -> None:
    env = dict(os.environ, LOGURU_LEVEL="WARNING", KILL_WHERE=where, KILL_AT=str(at))
    proc = subprocess.run([sys.executable, "-c", _KILLER, *args], env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def _files(out: Path) -> dict[str, str]:
    """name -> sha256 of every file in `out` (the lock file too, were it left)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()}


def _ok(res) -> None:
    assert res.exit_code == 0, res.output


@pytest.fixture(scope="module")
def reference(tiny_dir, text_file, tmp_path_factory):
    """reference(name) -> the files of an uninterrupted run (through the CLI, like the resumed ones)."""
    cache: dict[str, dict[str, str]] = {}

    def get(name: str) -> dict[str, str]:
        if name not in cache:
            out = tmp_path_factory.mktemp(f"ref_{name}") / "stats"
            _ok(run_cli("calibrate", *_args(tiny_dir(name), out, text_file)))
            cache[name] = _files(out)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def interrupted(tiny_dir, text_file, tmp_path_factory) -> Path:
    """A BERT run killed before its second block's statistics: block 0 journaled with its hidden-state checkpoint."""
    out = tmp_path_factory.mktemp("interrupted") / "stats"
    _killed(_args(tiny_dir("bert"), out, text_file), "stats", 2)
    return out


def tree_state(*roots: Path) -> dict[str, str]:  # the lock file names its last holder (a refused run too)
    return {k: v for k, v in states(*roots).items() if not k.endswith(C.LOCK_FILE)}


def _copy(interrupted: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(interrupted, tmp_path / "stats", symlinks=True))


def test_llama_killed_at_three_points_then_resumed_is_byte_identical(reference, tiny_dir, text_file, tmp_path):
    """Killed after block 0's statistics and checkpoint were written but not journaled (resume redoes block 0), then
    before block 1's statistics (resume keeps block 0, untouched), then before the manifest (resume only writes it)."""
    out = tmp_path / "stats"
    args = _args(tiny_dir("llama"), out, text_file)
    _killed(args, "checkpoint", 1)
    assert sorted(_files(out)) == [C.LOCK_FILE, "lplr_calibration_hidden-00001.safetensors", C.CALIB_PROGRESS,
                                   "lplr_stats-00000.safetensors"]
    with pytest.raises(LplrError, match="interrupted calibrate run.*--resume"):
        load_calibration(out)
    _killed([*args, "--resume"], "stats", 2)
    kept = (out / "lplr_stats-00000.safetensors").stat().st_ino
    _killed([*args, "--resume"], "manifest", 1)
    res = run_cli("calibrate", *args, "--resume")
    _ok(res)
    assert "resuming: 2 of 2 block run(s) kept" in res.stderr
    assert _files(out) == reference("llama")  # statistics and manifest; no journal, checkpoint or lock left
    assert (out / "lplr_stats-00000.safetensors").stat().st_ino == kept


@pytest.mark.parametrize("name", ["bert", "albert_groups"])
def test_resumed_after_the_first_block_is_byte_identical(name, reference, interrupted, tiny_dir, text_file,
                                                         tmp_path):
    """BERT, and an ALBERT whose forward calls block 0 twice, then block 1 twice: the resumed run starts block 1's
    first call from the checkpoint and re-captures the arguments of both its calls."""
    if name == "bert":
        out = _copy(interrupted, tmp_path)
    else:
        out = tmp_path / "stats"
        _killed(_args(tiny_dir(name), out, text_file), "stats", 2)
    assert sorted(_files(out)) == [C.LOCK_FILE, "lplr_calibration_hidden-00001.safetensors", C.CALIB_PROGRESS,
                                   "lplr_stats-00000.safetensors"]
    res = run_cli("calibrate", *_args(tiny_dir(name), out, text_file), "--resume")
    _ok(res)
    assert "resuming: 1 of 2 block run(s) kept" in res.stderr
    assert _files(out) == reference(name)


CHANGES = {  # a setting or input changed between the kill and --resume -> what the one-line error names
    "samples": (("--samples", "5"), "--samples changed since the interrupted run (was 6, now 5)"),
    "batch size": (("--batch-size", "2"), "--batch-size changed"),
    "accumulate dtype": (("--accumulate-dtype", "float64"), "--accumulate-dtype changed"),
    "text": ((), "the calibration text changed"),
}


@pytest.mark.parametrize("case", list(CHANGES))
def test_resume_refuses_a_changed_setting_naming_it(case, interrupted, tiny_dir, text_file, tmp_path):
    out = _copy(interrupted, tmp_path)
    text = text_file
    if case == "text":
        text = tmp_path / "other.txt"
        text.write_text(text_file.read_text(encoding="utf-8").replace("fox", "cat"), encoding="utf-8")
    extra, needle = CHANGES[case]
    before = tree_state(out)
    error_line(run_cli("calibrate", *_args(tiny_dir("bert"), out, text), *extra, "--resume"),
               f"cannot resume in {out}: {needle}", "rerun with the same settings or use --overwrite")
    assert tree_state(out) == before


def test_resume_and_plain_runs_are_refused_where_they_do_not_belong(interrupted, tiny_dir, text_file, tmp_path):
    src, out = tiny_dir("bert"), _copy(interrupted, tmp_path)

    def run(where: Path, *extra: str):
        return run_cli("calibrate", *_args(src, where, text_file), *extra)

    before = tree_state(out)
    error_line(run(out, "--resume", "--overwrite"), "--overwrite and --resume contradict each other")
    error_line(run(out), "holds an interrupted run writing calibration statistics; pass --resume to continue it "
                         "or --overwrite to start again")
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    error_line(run(out, "--resume"), "holds 1 file(s) that the interrupted run's journal does not list (first: "
                                     "notes.txt)")
    (out / "notes.txt").unlink()
    assert tree_state(out) == before
    _ok(run(out, "--overwrite"))  # starts again: the interrupted run's files go
    assert sorted(_files(out)) == [C.CALIB_MANIFEST, "lplr_stats-00000.safetensors", "lplr_stats-00001.safetensors"]
    finished = tree_state(out)
    error_line(run(out, "--resume"), "already holds finished calibration statistics (lplr_calibration.json); "
                                     "nothing to resume")
    assert tree_state(out) == finished
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine", encoding="utf-8")
    error_line(run(foreign, "--resume"), "is not an interrupted run writing calibration statistics (no "
                                         "lplr_calibration_progress.json)")
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("damaged", ["lplr_stats-00000.safetensors", "lplr_calibration_hidden-00001.safetensors"])
def test_a_damaged_kept_file_means_every_block_is_redone(damaged, reference, interrupted, tiny_dir, text_file,
                                                         tmp_path):
    """Only the hidden states after the last finished block are kept, so a kept statistics file or checkpoint that
    fails its sha256 sends the run back to the first block (with a warning naming the file); the result is still
    the uninterrupted run's."""
    out = _copy(interrupted, tmp_path)
    data = bytearray((out / damaged).read_bytes())
    data[-1] ^= 0x01
    (out / damaged).write_bytes(bytes(data))
    res = run_cli("calibrate", *_args(tiny_dir("bert"), out, text_file), "--resume")
    _ok(res)
    assert f"{damaged} is missing or damaged" in res.stderr and "every block is redone" in res.stderr
    assert "resuming: 0 of 2 block run(s) kept" in res.stderr
    assert _files(out) == reference("bert")


def test_a_full_disk_is_a_one_line_error_and_the_run_resumes(reference, tiny_dir, text_file, tmp_path, monkeypatch):
    """The second block's statistics file fails to write for want of space: one line says to free space and resume
    (no traceback, no manifest, no partial file), and --resume keeps the first block."""
    import errno

    from lplr_convert.calibration import run as run_module

    real, calls = run_module.save_block, []

    def save_block(out, block, tensors):
        calls.append(block)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(out, block, tensors)

    out, args = tmp_path / "stats", _args(tiny_dir("bert"), tmp_path / "stats", text_file)
    monkeypatch.setattr(run_module, "save_block", save_block)
    error_line(run_cli("calibrate", *args), f"writing {out} failed (No space left on device); the output is left "
               f"incomplete (no {C.CALIB_MANIFEST}): free disk space, then re-run with --resume")
    assert sorted(_files(out)) == [C.LOCK_FILE, "lplr_calibration_hidden-00001.safetensors", C.CALIB_PROGRESS,
                                   "lplr_stats-00000.safetensors"]
    monkeypatch.setattr(run_module, "save_block", real)
    res = run_cli("calibrate", *args, "--resume")
    _ok(res)
    assert "resuming: 1 of 2 block run(s) kept" in res.stderr and _files(out) == reference("bert")


@pytest.mark.parametrize("case", ["not json", "file outside", "checkpoint of another run count"])
def test_a_damaged_journal_is_named(case, interrupted, tiny_dir, text_file, tmp_path):
    """A journal this tool did not write as it stands (unreadable, naming a file outside the STATS patterns, or a
    checkpoint that does not follow its last block) is refused before anything is read or deleted through it."""
    import json

    out = _copy(interrupted, tmp_path)
    journal = out / C.CALIB_PROGRESS
    doc = json.loads(journal.read_text(encoding="utf-8"))
    if case == "file outside":
        doc["blocks"][0]["file"] = "../lplr_stats-00000.safetensors"
    elif case == "checkpoint of another run count":
        doc["hidden"]["file"] = C.CALIB_HIDDEN_TEMPLATE.format(runs=2)
    journal.write_text("{" if case == "not json" else json.dumps(doc), encoding="utf-8")
    before = tree_state(out)
    error_line(run_cli("calibrate", *_args(tiny_dir("bert"), out, text_file), "--resume"),
               f"{journal} is damaged; start again with --overwrite")
    assert tree_state(out) == before
