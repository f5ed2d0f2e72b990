"""Out-of-tree methods: an installed distribution declares its method in the entry-point group
`lplr_convert.methods`; the installed CLI and the loaders of a fresh process find it (convert, load, verify)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

PLUGIN = '''\
"""plugrtn: round-to-nearest from a package outside lplr_convert."""
from dataclasses import dataclass

from lplr_convert.methods import register
from lplr_convert.methods.rtn import RTN, RTNSettings


@dataclass(frozen=True)
class PlugSettings(RTNSettings):
    """As rtn's."""


@register("plugrtn")
class PlugRTN(RTN):
    settings_cls = PlugSettings
'''


def _install(target: Path) -> None:
    """What `pip install --target` leaves of a one-module distribution: the module and its .dist-info with
    METADATA and entry_points.txt."""
    (target / "plugrtn_pkg").mkdir(parents=True)
    (target / "plugrtn_pkg" / "__init__.py").write_text(PLUGIN)
    info = target / "plugrtn_pkg-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: plugrtn-pkg\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[lplr_convert.methods]\nplugrtn = plugrtn_pkg\n")
    (info / "RECORD").write_text("")


def _run(target: Path, *args: str) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), str(root)]), LOGURU_LEVEL="WARNING")
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300, check=False)


def test_an_installed_method_converts_loads_and_verifies_in_a_fresh_process(tiny_llama_dir, tmp_path):
    target, out = tmp_path / "site", tmp_path / "out"
    _install(target)
    help_text = _run(target, "-m", "lplr_convert.cli", "convert", "--help").stdout
    assert "plugrtn" in help_text
    res = _run(target, "-m", "lplr_convert.cli", "convert", "--in-path", str(tiny_llama_dir), "--out-path", str(out),
               "--method", "plugrtn", "--b0", "4", "--no-report")
    assert res.returncode == 0, res.stderr
    records = json.loads((out / "lplr_manifest.json").read_text())["tensors"]
    assert {r["method"] for r in records} == {"plugrtn", "copy"}
    check = textwrap.dedent(f"""
        import torch
        from lplr_convert import load_model
        from lplr_convert.verify import verify
        model = load_model({str(out)!r})
        logits = model(torch.tensor([[1, 2, 3]])).logits
        assert torch.isfinite(logits).all()
        verify({str(out)!r}, source={str(tiny_llama_dir)!r})
        print("ok")
    """)
    res = _run(target, "-c", check)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr
    # without the distribution on the path, the method is unknown and the output cannot be loaded: the entry point
    # (not this test's process) is what made it known
    res = _run(tmp_path / "empty", "-c", f"from lplr_convert import load_model; load_model({str(out)!r})")
    assert res.returncode != 0 and "plugrtn" in res.stderr


def test_a_broken_plugin_is_named_and_the_builtins_still_work(tmp_path):
    target = tmp_path / "site"
    _install(target)
    (target / "plugrtn_pkg" / "__init__.py").write_text("raise RuntimeError('boom')\n")
    res = _run(target, "-c", "from lplr_convert.methods import available_methods; print(available_methods())")
    assert res.returncode == 0 and "'rtn'" in res.stdout and "plugrtn" not in res.stdout
    assert "method plugin plugrtn (plugrtn_pkg) could not be loaded: RuntimeError: boom" in res.stderr
