"""decompress and export recover from an interruption (issue 24): a full disk or a file-size limit removes what they
wrote (the space is given back) and says to run the command again, an option that exists; a SIGKILL leaves a
progress marker by which `--overwrite` knows the leftovers as its own and replaces them."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
import torch
from lplr_testing import error_line, run_cli, run_cli_child

from lplr_convert import constants as C
from lplr_convert import load_state_dict

COMMANDS = {"decompress": ["decompress"], "compressed-tensors": ["export", "--format", "compressed-tensors"]}


@pytest.fixture(scope="module")
def conversion(tiny_llama_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("recovery") / "conv"
    res = run_cli("--in-path", str(tiny_llama_dir), "--out-path", str(out), "--method", "rtn", "--scheme",
                  "symmetric", "--no-report")
    assert res.exit_code == 0, res.output
    return out


def _child(args: list[str], **env) -> subprocess.CompletedProcess:
    return run_cli_child(*args, **env)


def _last_error(proc) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 1 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.mark.parametrize("command", COMMANDS)
def test_a_file_size_limit_removes_the_partial_output_and_names_a_fix_that_exists(conversion, tmp_path, command):
    out = tmp_path / "out"
    args = [*COMMANDS[command], "--in-path", str(conversion), "--out-path", str(out), "--max-shard-size", "200KB"]
    line = _last_error(_child(args, FSIZE="30000"))
    assert "File too large" in line and "run the command again" in line and "--resume" not in line
    assert not out.exists()  # nothing left behind: no partial data holding the space, no lock
    assert _child(args).returncode == 0
    assert (out / C.EXPORT_FILE).is_file() and not (out / C.EXPORT_PROGRESS).exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_overwrite_replaces_the_leftovers_of_a_killed_run(conversion, tmp_path, command):
    out, ref = tmp_path / "out", tmp_path / "ref"
    args = [*COMMANDS[command], "--in-path", str(conversion), "--max-shard-size", "20KB"]
    assert _child([*args, "--out-path", str(ref)]).returncode == 0
    proc = _child([*args, "--out-path", str(out)], KILL_AT="6")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    left = {p.name for p in out.iterdir()}
    assert C.EXPORT_PROGRESS in left and C.EXPORT_FILE not in left
    assert any(n.endswith((C.PARTIAL_SUFFIX, C.DATA_SUFFIX)) or n.startswith("model-") for n in left)
    error_line(run_cli(*args, "--out-path", str(out)), "not empty", "--overwrite")
    res = run_cli(*args, "--out-path", str(out), "--overwrite")
    assert res.exit_code == 0, res.output
    files = lambda d: {p.name: p.read_bytes() for p in d.iterdir() if p.name != C.EXPORT_FILE}
    assert files(out) == files(ref)  # exactly an uninterrupted run's files: no leftover, no marker
    assert not (out / C.EXPORT_PROGRESS).exists()


def test_overwrite_still_refuses_a_foreign_file_beside_the_leftovers(conversion, tmp_path):
    out = tmp_path / "out"
    args = ["decompress", "--in-path", str(conversion), "--max-shard-size", "20KB", "--out-path", str(out)]
    assert _child(args, KILL_AT="6").returncode == -signal.SIGKILL
    (out / "notes.txt").write_text("mine")
    error_line(run_cli(*args, "--overwrite"), "notes.txt")
    assert (out / "notes.txt").read_text() == "mine"


def test_an_interrupt_in_process_removes_what_was_written(conversion, tmp_path, monkeypatch):
    from lplr_convert.export import decompress
    from lplr_convert.io import writer

    calls = [0]
    orig = writer.ShardWriter.add_group

    def add_group(self, *a, **k):
        calls[0] += 1
        if calls[0] == 5:
            raise KeyboardInterrupt
        return orig(self, *a, **k)

    monkeypatch.setattr(writer.ShardWriter, "add_group", add_group)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        decompress(conversion, out, max_shard_size=20_000)
    assert not out.exists()
    assert torch.is_tensor(next(iter(load_state_dict(conversion).values())))
