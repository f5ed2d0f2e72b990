"""Resume and the run options that change bytes (issue 24): threads (the effective value, a default included), the
executor, the devices' automatic arithmetic (bfloat16 sketch, int8 products). A resume with any of them changed
refuses, naming it in one line; with them unchanged it completes byte-identically (test_reliability)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from lplr_testing import error_line, run_cli, tree_state
from test_reliability import _outputs, _run

from lplr_convert import constants as C


def _killed(src, out, *extra):
    args = ["--in-path", str(src), "--out-path", str(out), "--max-shard-size", "30KB", "--seed", "3", "--no-report",
            *extra]
    proc = _run(args, kill=("add_group", 5))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (out / C.PROGRESS_FILE).is_file()
    return args


def _refused(args, *needles):
    """The resume is refused in one line naming the setting, and nothing in the output changes."""
    out = Path(args[args.index("--out-path") + 1])
    before = {k: v for k, v in tree_state(out).items() if not k.endswith(C.LOCK_FILE)}
    error_line(run_cli(*args), *needles, "--overwrite")
    assert {k: v for k, v in tree_state(out).items() if not k.endswith(C.LOCK_FILE)} == before


def test_resume_at_other_threads_is_refused_naming_them(tiny_llama_dir, tmp_path):
    """Today: interrupted at --threads 1, resumed at --threads 2, exit 0 with shards of neither run."""
    args = _killed(tiny_llama_dir, tmp_path / "out", "--threads", "1")
    _refused([*args[:-2], "--threads", "2", "--resume"], "--threads changed", "was 1, now 2")
    assert run_cli(*args, "--resume").exit_code == 0


def test_resume_of_a_pool_run_in_process_is_refused_naming_the_executor(tiny_llama_dir, tmp_path):
    """Today: a --workers 2 run (threads: cores / workers) resumed in this process (threads: torch's default) exits
    0; the executor and its thread count decide the bytes."""
    args = _killed(tiny_llama_dir, tmp_path / "out", "--workers", "2")
    _refused([*args[:-2], "--resume"], "executor", "local pool", "in-process")


@pytest.mark.parametrize("probe", ["lplr_convert.math.sketch.native_bfloat16",
                                   "lplr_convert.math.lstsq.integer_matmul"])
def test_resume_on_other_arithmetic_is_refused(tiny_llama_dir, tmp_path, monkeypatch, probe):
    """A resume on a machine whose automatic arithmetic differs (bfloat16 sketch products, int8 Gram products:
    another CPU or GPU behind the same device name) would mix the two machines' bits."""
    args = _killed(tiny_llama_dir, tmp_path / "out")
    module, name = probe.rsplit(".", 1)
    real = getattr(__import__(module, fromlist=[name]), name)
    monkeypatch.setattr(probe, lambda d: not real(d))
    _refused([*args, "--resume"], "automatic arithmetic", name)


def test_resume_with_the_same_options_is_byte_identical(tiny_llama_dir, tmp_path):
    ref = tmp_path / "ref"
    args = _killed(tiny_llama_dir, tmp_path / "out", "--threads", "1")
    assert _run([*args, "--resume"]).returncode == 0
    assert _run([a if a != str(tmp_path / "out") else str(ref) for a in args]).returncode == 0
    assert _outputs(tmp_path / "out") == _outputs(ref)
