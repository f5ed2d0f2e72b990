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


def tiny_checkpoint(path: Path, tensors: dict, config: dict | None = None) -> Path:
    """A checkpoint directory: model.safetensors with `tensors` and a config.json (llama by default)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config or {"model_type": "llama"}))
    return path
