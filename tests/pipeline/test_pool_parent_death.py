"""Workers die with their parent (issue 24): a `--workers 2` run whose main process is SIGKILLed or SIGTERMed while
its workers compute leaves no process behind (workers, multiprocessing's resource tracker), within a bounded
time."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Loaded by every interpreter with this directory on PYTHONPATH (the driver and its spawned workers): each worker
# announces itself and then computes "forever", so that the driver is killed while its workers are busy.
SITECUSTOMIZE = """\
import os, time
if os.environ.get("LPLR_TEST_SLOW_DIR"):
    import lplr_convert.pipeline.task as task
    def run_job(job, t, device, stats=None):
        open(os.path.join(os.environ["LPLR_TEST_SLOW_DIR"], str(os.getpid())), "w").close()
        time.sleep(120)
    task.run_job = run_job
"""


def _session(sid: int) -> list[int]:
    """Live (not zombie) processes of session `sid`."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, pgrp, session, ...
            if int(fields[3]) == sid and fields[0] != "Z":
                pids.append(int(d.name))
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_workers_die_with_their_parent(tiny_llama_dir, tmp_path, sig):
    hook, busy = tmp_path / "hook", tmp_path / "busy"
    hook.mkdir()
    busy.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = dict(os.environ, LPLR_TEST_SLOW_DIR=str(busy), LOGURU_LEVEL="WARNING",
               PYTHONPATH=os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "lplr_convert.cli", "--in-path", str(tiny_llama_dir), "--out-path",
           str(tmp_path / "out"), "--workers", "2", "--no-report"]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(list(busy.iterdir())) < 2:  # both workers are computing
            assert proc.poll() is None and time.monotonic() < deadline, "the workers never started"
            time.sleep(0.2)
        assert len(_session(proc.pid)) >= 3  # the driver, two workers (and the resource tracker)
        proc.send_signal(sig)
        proc.wait(30)
        deadline = time.monotonic() + 15
        while (left := _session(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, f"processes left behind after {sig.name} of the driver: {left}"
    finally:
        for pid in _session(proc.pid):
            os.kill(pid, signal.SIGKILL)
        proc.kill()
        proc.wait()
