"""What the benchmarks record of the machine and the tree they ran on (shared by scripts/bench.py and
scripts/bench_runtime.py, which import it from their own folder)."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path


def machine_facts(root: Path) -> dict:
    """The CPU model, core count, Python version, the git revision of `root` (+dirty when tracked files changed) and
    the load average now."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=root, check=False)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=root, check=False)
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "git": git.stdout.strip() + ("+dirty" if dirty.stdout.strip() else ""),
            "loadavg": [round(x, 2) for x in os.getloadavg()]}
