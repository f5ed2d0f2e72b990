"""Ctrl-C while the command line is still starting (importing torch takes seconds) is answered in one line, like
Ctrl-C at any other time: no traceback, exit status 130."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def test_ctrl_c_during_start_up_prints_one_line_and_no_traceback(tmp_path):
    script = Path(sys.executable).parent / "lplr-convert"
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.Popen([str(script), "inspect", "--in-path", str(tmp_path / "absent")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    time.sleep(0.3)  # inside the imports (torch alone takes over a second)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert "Traceback" not in err, err
    assert proc.returncode == 130, (proc.returncode, err)
    assert err.strip().splitlines()[-1].startswith("interrupted")
