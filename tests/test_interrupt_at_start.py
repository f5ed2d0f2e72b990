"""Ctrl-C while the command line is still starting (importing torch takes seconds) is answered in one line, like
Ctrl-C at any other time: no traceback, exit status 130. The interrupt is raised deterministically where a real
Ctrl-C lands most often: inside the imports of the command line (here, when it imports click)."""

import subprocess
import sys

CHILD = """
import builtins, sys
real = builtins.__import__
def interrupted(name, *args, **kwargs):
    if name == "click":
        raise KeyboardInterrupt
    return real(name, *args, **kwargs)
builtins.__import__ = interrupted
from lplr_convert._entry import main  # the console script's entry point (pyproject [project.scripts])
sys.argv = ["lplr-convert", "--help"]
main()
"""


def test_ctrl_c_during_start_up_prints_one_line_and_no_traceback():
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 130, (proc.returncode, proc.stderr)
    assert proc.stderr.strip() == "interrupted"


def test_the_console_script_is_that_entry_point():
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["lplr-convert"] == "lplr_convert._entry:main"
