"""Every network wait is bounded (issue 24): a Hub that accepts connections and never answers (push, and
`--in-path OWNER/NAME`), a Ray address where nothing listens, and one that accepts and never answers, each end in a
one-line error naming the timeout and its setting (LPLR_NETWORK_TIMEOUT) within a bounded time."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from lplr_convert import constants as C


class SilentServer:
    """A TCP server on 127.0.0.1 that accepts every connection, reads what it is sent and never answers."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.stop = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.conns.append(conn)

    def close(self) -> None:
        self.stop = True
        for c in self.conns:
            c.close()
        self.sock.close()


@pytest.fixture
def silent():
    server = SilentServer()
    yield server
    server.close()


def _cli(tmp_path, *args: str, endpoint: str | None = None, timeout: str = "2"):
    env = dict(os.environ, LOGURU_LEVEL="WARNING", HF_HOME=str(tmp_path / "hf_home"), HF_TOKEN="hf_" + "x" * 34,
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_ETAG_TIMEOUT="2", HF_HUB_DOWNLOAD_TIMEOUT="2",
               **{C.NETWORK_TIMEOUT_ENV: timeout})
    env.pop("HF_HUB_OFFLINE", None)
    if endpoint:
        env["HF_ENDPOINT"] = endpoint
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "lplr_convert.cli", *args], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    return proc, time.monotonic() - t0


def _one_line(proc, *needles: str) -> str:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_push_to_a_hub_that_never_answers_ends_in_one_line(converted, silent, tmp_path):
    out = converted("rtn")
    proc, took = _cli(tmp_path, "push", "--in-path", str(out), "--repo-id", "me/model",
                      endpoint=f"http://127.0.0.1:{silent.port}")
    _one_line(proc, "no answer within 2 s", C.NETWORK_TIMEOUT_ENV)
    assert took < 60


def test_hub_download_from_a_hub_that_never_answers_ends_in_one_line(silent, tmp_path):
    proc, took = _cli(tmp_path, "--in-path", "owner/name", "--out-path", str(tmp_path / "out"),
                      endpoint=f"http://127.0.0.1:{silent.port}")
    _one_line(proc, "owner/name", "no answer within 2 s", C.NETWORK_TIMEOUT_ENV)
    assert took < 60
    assert not (tmp_path / "out").exists()


def test_bad_timeout_setting_is_named(silent, tmp_path):
    proc, _ = _cli(tmp_path, "--in-path", "owner/name", "--out-path", str(tmp_path / "out"),
                   endpoint=f"http://127.0.0.1:{silent.port}", timeout="-1")
    _one_line(proc, C.NETWORK_TIMEOUT_ENV, "positive number of seconds")


def test_ray_address_where_nothing_listens_fails_at_once(tiny_llama_dir, tmp_path):
    pytest.importorskip("ray")
    proc, took = _cli(tmp_path, "--in-path", str(tiny_llama_dir), "--out-path", str(tmp_path / "out"),
                      "--ray-address", "127.0.0.1:1", timeout="5")
    _one_line(proc, "--ray-address 127.0.0.1:1", "cannot be reached", "ray start --head")
    assert took < 60


def test_ray_address_that_never_answers_ends_in_one_line(tiny_llama_dir, silent, tmp_path):
    pytest.importorskip("ray")
    proc, took = _cli(tmp_path, "--in-path", str(tiny_llama_dir), "--out-path", str(tmp_path / "out"),
                      "--ray-address", f"127.0.0.1:{silent.port}", timeout="3")
    _one_line(proc, f"--ray-address 127.0.0.1:{silent.port}", "no answer within 3 s", C.NETWORK_TIMEOUT_ENV)
    assert proc.returncode == 1
    assert took < 90
