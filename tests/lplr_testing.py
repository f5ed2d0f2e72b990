"""Helpers shared by the tests (a uniquely named module, so it never collides with a conftest)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def run_cli(*args: str):
    """Run the real CLI in-process through click's runner; returns the click Result."""
    from click.testing import CliRunner

    from lplr_convert.cli import main

    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def error_line(res, *needles: str) -> str:
    """The one `error:` line of a failed CLI run (non-zero exit, no traceback), checked to contain every needle."""
    assert res.exit_code != 0, res.output
    assert "Traceback" not in res.output
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def tree_state(*roots: Path) -> dict[str, str]:
    """Every entry below `roots` (links not followed) -> sha256 of a file, a link's target, or "dir": compare two
    states to prove that nothing there changed."""
    state = {}
    for root in roots:
        state[str(root)] = "dir" if root.is_dir() else "absent"
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                if p.is_symlink():
                    state[str(p)] = "link:" + os.readlink(p)
                elif p.is_dir():
                    state[str(p)] = "dir"
                else:
                    state[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return state


def tampered_copy(dst: Path, out: Path, edit) -> tuple[Path, str]:
    """A copy of the conversion `dst` at `out` whose manifest record of the first compressed weight is edited by
    `edit(record)`, integrity hash recomputed (a manifest consistent in itself that disagrees with the shards); and
    that record's name."""
    import shutil

    from lplr_convert import constants as C
    from lplr_convert.io.manifest import integrity_hash

    shutil.copytree(dst, out)
    doc = json.loads((out / C.MANIFEST_FILE).read_text())
    rec = next(r for r in doc["tensors"] if r["method"] not in ("copy", "laser"))
    edit(rec)
    doc[C.M_INTEGRITY] = integrity_hash(doc)
    (out / C.MANIFEST_FILE).write_text(json.dumps(doc))
    return out, rec["name"]


def refused_in_one_line(calls, match: str) -> None:
    """Each of `calls` raises an LplrError of one line matching `match`."""
    import pytest

    from lplr_convert.errors import LplrError

    for call in calls:
        with pytest.raises(LplrError, match=match) as e:
            call()
        assert "\n" not in str(e.value)


def tiny_checkpoint(path: Path, tensors: dict, config: dict | None = None) -> Path:
    """A checkpoint directory: model.safetensors with `tensors` and a config.json (llama by default)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config or {"model_type": "llama"}))
    return path


# The real CLI in a child process: with FSIZE (bytes) under that file-size limit, as a full disk would stop it; with
# KILL_AT = n it SIGKILLs itself before the shard writer takes its n-th tensor.
_CHILD_CLI = r"""
import os, resource, signal, sys
if os.environ.get("FSIZE"):
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    n = int(os.environ["FSIZE"])
    resource.setrlimit(resource.RLIMIT_FSIZE, (n, n))
if os.environ.get("KILL_AT"):
    from lplr_convert.io import writer
    n, count = int(os.environ["KILL_AT"]), [0]
    orig = writer.ShardWriter.add_group
    def add_group(self, *a, **k):
        count[0] += 1
        if count[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return orig(self, *a, **k)
    writer.ShardWriter.add_group = add_group
from lplr_convert.cli import main
sys.argv = ["lplr-convert", *sys.argv[1:]]
main()
"""


def run_cli_child(*args: str, **env: str):
    """`lplr-convert ARGS` in a child process (see _CHILD_CLI for FSIZE and KILL_AT); the CompletedProcess."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", _CHILD_CLI, *args],
                          env=dict(os.environ, LOGURU_LEVEL="WARNING", **env), capture_output=True, text=True,
                          timeout=300, check=False)
