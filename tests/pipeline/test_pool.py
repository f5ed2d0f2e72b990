"""The local worker pool: byte-identical to a single-process run, a killed worker fails the run with a named error
and --resume completes it byte-identically, and a worker's own errors reach the command line unchanged."""

from __future__ import annotations

import os

import pytest
import torch
from executor_testing import convert_args, run_like_reference, snapshot
from lplr_testing import run_cli
from safetensors.torch import save_file

from lplr_convert import IncompleteOutputError
from lplr_convert import constants as C
from lplr_convert.io.manifest import read_manifest

# Loaded at the start of every interpreter that has this directory on PYTHONPATH (the spawned workers): the worker
# that is given the named tensor kills itself with SIGKILL, as the OOM killer would.
SITECUSTOMIZE = """\
import os
if os.environ.get("LPLR_TEST_KILL_TENSOR"):
    import lplr_convert.pipeline.task as task
    _run_job = task.run_job
    def run_job(job, t, device):
        if job.name == os.environ["LPLR_TEST_KILL_TENSOR"]:
            os.kill(os.getpid(), 9)
        return _run_job(job, t, device)
    task.run_job = run_job
"""
KILLED = "model.layers.1.self_attn.q_proj.weight"


def test_two_workers_write_the_same_bytes(reference, tiny_llama_dir, tmp_path):
    opts = run_like_reference(reference, tiny_llama_dir, tmp_path / "out", "--workers", "2")
    assert opts["executor"] == "local pool" and opts["workers"] == 2 and opts["threads"] >= 1


def test_killed_worker_fails_the_run_by_name_then_resume_completes_it(reference, tiny_llama_dir, tmp_path,
                                                                     monkeypatch):
    recipe, ref = reference
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("LPLR_TEST_KILL_TENSOR", KILLED)
    out = tmp_path / "out"
    args = convert_args(tiny_llama_dir, out, recipe, "--workers", "2")
    res = run_cli(*args)
    assert res.exit_code == 1
    last = res.output.strip().splitlines()[-1]
    assert last.startswith("error: worker ") and f"was killed by SIGKILL while compressing {KILLED}" in last
    assert "--resume" in last
    with pytest.raises(IncompleteOutputError):
        read_manifest(out)
    journal = (out / C.PROGRESS_FILE).read_text()
    assert KILLED not in journal  # nothing of the killed tensor was claimed complete
    monkeypatch.delenv("LPLR_TEST_KILL_TENSOR")
    res = run_cli(*args, "--resume")
    assert res.exit_code == 0, res.output
    assert snapshot(out) == ref
    assert not (out / C.PROGRESS_FILE).exists()


def test_a_workers_own_error_reaches_the_command_line_as_is(tmp_path):
    src = tmp_path / "nan"
    src.mkdir()
    bad = torch.ones(8, 4)
    bad[3, 1] = float("nan")
    save_file({"model.layers.0.mlp.up_proj.weight": torch.ones(8, 4), "model.layers.1.mlp.up_proj.weight": bad},
              str(src / "model.safetensors"))
    res = run_cli("--in-path", str(src), "--out-path", str(tmp_path / "out"), "--workers", "2", "--no-report")
    assert res.exit_code == 1
    assert res.output.strip().splitlines()[-1] == (
        "error: tensor model.layers.1.mlp.up_proj.weight contains NaN or Inf; fix the checkpoint, or pass "
        "--on-nonfinite copy to keep such tensors verbatim")


def test_device_and_devices_contradict(tiny_llama_dir, tmp_path):
    res = run_cli("--in-path", str(tiny_llama_dir), "--out-path", str(tmp_path / "o"), "--device", "cpu",
                  "--devices", "cpu")
    assert res.exit_code == 1 and "--device and --devices contradict" in res.output
