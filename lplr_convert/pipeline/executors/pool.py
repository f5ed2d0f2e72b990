"""A pool of local worker processes (spawned), one device each: each worker reads its own tensors from the source by
byte range, compresses them and sends back the stored bytes and the record through its pipe.

Transport: one pipe per worker; a result travels as a pickled header plus one byte buffer (`pack_result`), received
into a fresh buffer the tensors are views of. At most `ahead` (default 2 per worker) tensors are under way or waiting
to be written, which bounds the driver's memory; each worker holds one tensor and its temporaries.

A worker that dies (killed, out of memory, a crash in native code) fails the run with `WorkerError`, naming the
worker and its tensor; nothing is marked complete, so `--resume` finishes the run. A worker never outlives the driver,
whatever signal ends it: on Linux the kernel kills it when the driver exits (PR_SET_PDEATHSIG), and everywhere a
watchdog thread ends it within a second of the driver's death; multiprocessing's resource tracker then sees its pipe
close and exits too.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from multiprocessing.connection import Connection, wait

from loguru import logger

from ...errors import LplrError, opt
from ...io.reader import SourceCheckpoint
from ..task import JobResult, TensorJob, pack_result, read_tensor, run_job, unpack_result
from . import WorkerError
from .ordered import in_order

__all__ = ["LocalPool", "worker_main"]

_STOP_SECONDS = 10.0


_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_WATCH_SECONDS = 1.0


def _die_with_parent(parent: int) -> None:
    """End this process when the driver `parent` dies, by any signal: the kernel's parent-death signal on Linux (at
    once), and a watchdog thread polling the parent pid everywhere (a spawned worker's parent is the driver; once
    the driver is gone the worker is re-parented)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the watchdog below still holds
    if os.getppid() != parent:  # the driver died before the signal was armed
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_WATCH_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="lplr-parent-watchdog", daemon=True).start()


def _setup_worker(device: str, threads: int, log_level: str, parent: int):
    _die_with_parent(parent)
    import torch

    from ...devices import resolve_device

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver decides what an interrupt stops
    torch.set_num_threads(threads)
    logger.remove()
    logger.add(sys.stderr, level=log_level, format="<level>{level: <7}</level> {message}", colorize=None)
    return resolve_device(device)


def worker_main(conn: Connection, src: SourceCheckpoint, device: str, threads: int, log_level: str,
                parent: int | None = None) -> None:
    """A worker process: compress the jobs the driver sends (None stops it); answer each with a result or an error.
    It dies with the driver (`parent`, its pid)."""
    dev = _setup_worker(device, threads, log_level, os.getppid() if parent is None else parent)
    while True:
        try:
            job = conn.recv()
        except EOFError:  # the driver is gone
            return
        if job is None:
            return
        try:
            header, buf = pack_result(run_job(job, read_tensor(src, job.name, pin=dev.type == "cuda"), dev))
        except LplrError as e:
            conn.send(("lplr", e))
            continue
        except BaseException as e:  # noqa: BLE001  (reported to the driver, which fails the run)
            conn.send(("error", f"{type(e).__name__}: {e}", traceback.format_exc()))
            continue
        conn.send(("ok", header))
        conn.send_bytes(buf)


def _exit_text(code: int | None) -> str:
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class _Worker:
    def __init__(self, ctx, index: int, src: SourceCheckpoint, device: str, threads: int, log_level: str):
        self.index, self.device, self.job = index, device, None
        self.conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=worker_main, args=(child, src, device, threads, log_level, os.getpid()),
                                   name=f"lplr-worker-{index}", daemon=True)
        self.process.start()
        child.close()

    def crashed(self, name: str | None) -> WorkerError:
        self.process.join(1.0)
        what = f"while compressing {name}" if name else "between tensors"
        return WorkerError(f"worker {self.index} (pid {self.process.pid}, {self.device}) "
                           f"{_exit_text(self.process.exitcode)} {what}; the output is incomplete (nothing was "
                           f"marked complete): re-run with {opt('resume')} (if it ran out of memory, use fewer "
                           f"{opt('workers')})")


class LocalPool:
    """`workers` spawned processes over `devices` (worker i uses devices[i % len(devices)]), each with `threads`
    torch threads."""

    def __init__(self, src: SourceCheckpoint, devices: list[str], workers: int, threads: int, log_level: str = "INFO",
                 ahead: int | None = None):
        self.src, self.devices, self.n, self.threads, self.log_level = src, devices, workers, threads, log_level
        self.ahead = ahead or 2 * workers
        self.workers: list[_Worker] = []

    def __enter__(self):
        ctx = mp.get_context("spawn")
        try:
            for i in range(self.n):
                self.workers.append(_Worker(ctx, i, self.src, self.devices[i % len(self.devices)], self.threads,
                                            self.log_level))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def close(self) -> None:
        """Stop every worker: ask, wait a little, then terminate."""
        for w in self.workers:
            try:
                w.conn.send(None)
            except (OSError, ValueError):
                pass
        for w in self.workers:
            w.process.join(_STOP_SECONDS if w.job is None else 0.1)
            if w.process.is_alive():
                w.process.terminate()
                w.process.join(_STOP_SECONDS)
            w.conn.close()
        self.workers = []

    def run(self, jobs: list[TensorJob]) -> Iterator[JobResult]:
        def start(i: int) -> bool:
            idle = next((w for w in self.workers if w.job is None), None)
            if idle is None:
                return False
            idle.job = i
            try:
                idle.conn.send(jobs[i])
            except OSError:
                raise idle.crashed(jobs[i].name) from None
            return True

        def finished() -> list[tuple[int, JobResult]]:
            conns = {w.conn: w for w in self.workers if w.job is not None}
            sentinels = {w.process.sentinel: w for w in self.workers}
            ready = wait([*conns, *sentinels])
            out = []
            for w in (conns[r] for r in ready if r in conns):
                out.append((w.job, self._receive(w, jobs)))
                w.job = None
            for w in (sentinels[r] for r in ready if r in sentinels):  # a worker never exits during a run
                raise w.crashed(None if w.job is None else jobs[w.job].name)
            return out

        return in_order(len(jobs), start, finished, self.ahead)

    def _receive(self, w: _Worker, jobs: list[TensorJob]) -> JobResult:
        name = jobs[w.job].name
        try:
            msg = w.conn.recv()
            if msg[0] == "ok":
                buf = bytearray(msg[1]["nbytes"])
                w.conn.recv_bytes_into(buf)
                return unpack_result(msg[1], buf)
        except (EOFError, OSError):
            raise w.crashed(name) from None
        if msg[0] == "lplr":
            raise msg[1]
        logger.debug(f"worker {w.index} traceback:\n{msg[2]}")
        raise WorkerError(f"worker {w.index} failed on {name} ({msg[1][:300]}); the output is incomplete: re-run "
                          f"with {opt('resume')} (the worker's traceback is logged at debug level)")
