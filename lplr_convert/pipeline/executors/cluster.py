"""A Ray cluster as executor: one task per tensor, the driver (this process) writing every shard.

Requirements: lplr-convert (the same version) is installed on every node, and the source checkpoint is visible at the
same path on every node (a shared filesystem): a task reads its tensor's byte range from that path. The output is
written by the driver only. A task needs `threads` CPUs (its torch threads) or, with `--device auto|cuda` on a
cluster that has GPUs, one GPU. At most `ahead` tasks are under way or waiting to be written; a task whose worker
died is retried `retries` times by Ray; the tool's own errors (e.g. a NaN weight) are not retried.

`local` starts a private Ray instance on this machine, reachable on the loopback address only, without usage
reporting; `auto` or HOST:PORT joins a running cluster. When Ray is already initialised in this process (e.g. by the
caller), that connection is used and left open. Joining a cluster is bounded: HOST:PORT must accept a connection,
and the cluster must answer, within LPLR_NETWORK_TIMEOUT seconds (`io.network`); otherwise a one-line error.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

from loguru import logger

from ...errors import LplrError, opt
from ...io.network import probe_address
from ...io.reader import SourceCheckpoint
from ..task import JobResult, TensorJob, pack_result, read_tensor, run_job, unpack_result
from . import WorkerError
from .ordered import in_order

__all__ = ["RayExecutor", "SourceNotVisibleError", "ray_job"]


class SourceNotVisibleError(LplrError):
    """A Ray node cannot see the source checkpoint at the driver's path."""


def _not_visible(src_root: str, host: str) -> SourceNotVisibleError:
    return SourceNotVisibleError(f"the source checkpoint {src_root} is not visible on Ray node {host}; every node "
                                 f"must see {opt('in_path')} at the same path (a shared filesystem such as NFS)")


def _probe(path: str) -> tuple[str, bool]:
    return socket.gethostname(), Path(path).is_file()


def ray_job(src: SourceCheckpoint, job: TensorJob, device: str, threads: int) -> tuple[dict, object]:
    """The body of one Ray task: the packed result (header, uint8 numpy array) of `job`, computed on this node."""
    import numpy as np
    import torch

    from ...devices import resolve_device

    host, seen = _probe(str(src.root / src.files[0]))
    if not seen:
        raise _not_visible(str(src.root), host)
    torch.set_num_threads(threads)
    dev = resolve_device(device)
    header, buf = pack_result(run_job(job, read_tensor(src, job.name, pin=dev.type == "cuda"), dev))
    return header, np.frombuffer(buf, dtype=np.uint8)


def _import_ray(local: bool):
    if local:  # a private instance: loopback only, no usage reporting (read when ray is first imported)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError:
        raise LplrError(f"{opt('ray_address')} needs the ray package; install it with "
                        f"`pip install 'lplr-convert[ray]'`") from None
    return ray


_JOIN_FIX = "start the cluster (`ray start --head`) and pass its address, or pass --ray-address local"


def _join_cluster(ray, address: str) -> None:
    """ray.init(address), bounded: first the address (HOST:PORT, or RAY_ADDRESS for auto) must accept a connection
    and answer an HTTP/2 greeting, as the cluster's GCS (a gRPC server) does at once, within `network_timeout()`;
    otherwise a one-line error, where Ray's own client would retry for minutes. Ray's own refusals become one line."""
    fix = _JOIN_FIX.replace("--ray-address", opt("ray_address"))
    target = os.environ.get("RAY_ADDRESS") if address == "auto" else address
    if target and "://" not in target:
        probe_address(target, opt("ray_address") if target == address else "RAY_ADDRESS", fix, greeting=_H2_GREETING)
    try:
        ray.init(address=address, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise LplrError(f"cannot join the Ray cluster at {opt('ray_address')} {address} ({type(e).__name__}: "
                        f"{first}); {fix}") from None


# The HTTP/2 client preface and an empty SETTINGS frame: a gRPC server answers with its own SETTINGS frame.
_H2_GREETING = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


class RayExecutor:
    """Tensor tasks on the Ray cluster at `address` (auto, HOST:PORT or local)."""

    def __init__(self, src: SourceCheckpoint, address: str, devices: list[str], threads: int, retries: int,
                 workers: int | None = None):
        self.src, self.address, self.devices, self.threads = src, address, devices, threads
        self.retries, self.workers = retries, workers
        self.ray, self._started, self._refs = None, False, {}

    def __enter__(self):
        ray = self.ray = _import_ray(self.address == "local")
        if not ray.is_initialized():
            if self.address == "local":
                cpus = (self.workers or 0) * self.threads or os.cpu_count() or 1
                ray.init(num_cpus=cpus, include_dashboard=False, configure_logging=False)
            else:
                _join_cluster(ray, self.address)
            self._started = True
        try:
            self._prepare(ray)
        except BaseException:
            self.close()
            raise
        return self

    def _prepare(self, ray) -> None:
        resources = ray.cluster_resources()
        want_gpu = any(d.startswith(("cuda", "auto")) for d in self.devices)
        gpus = int(resources.get("GPU", 0)) if want_gpu else 0
        if want_gpu and not gpus and not all(d == "auto" for d in self.devices):
            raise LplrError(f"{opt('devices')} {','.join(self.devices)}: the Ray cluster has no GPUs; use "
                            f"{opt('device')} cpu or auto")
        self.device = "cuda" if gpus else "cpu"
        slots = gpus or max(1, int(resources.get("CPU", 1)) // self.threads)
        self.ahead = 2 * (self.workers or slots)
        self._task = ray.remote(num_cpus=self.threads, num_gpus=1 if gpus else 0, max_retries=self.retries)(ray_job)
        self._src = ray.put(self.src)
        host, seen = ray.get(ray.remote(num_cpus=0)(_probe).remote(str(self.src.root / self.src.files[0])))
        if not seen:
            raise _not_visible(str(self.src.root), host)
        logger.info(f"Ray: {resources.get('CPU', 0):g} CPUs, {gpus} GPUs; tasks of {self.threads} thread(s) on "
                    f"{self.device}, at most {self.ahead} under way")

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def close(self) -> None:
        """Cancel what is still under way; shut Ray down if this executor started (or joined) it."""
        ray = self.ray
        if ray is None:
            return
        for ref in list(self._refs):
            try:
                ray.cancel(ref)
            except Exception:  # noqa: BLE001, S110  (best effort: the run is failing anyway)
                pass
        self._refs = {}
        if self._started:
            ray.shutdown()
            self._started = False

    def run(self, jobs: list[TensorJob]) -> Iterator[JobResult]:
        ray = self.ray

        def start(i: int) -> bool:
            self._refs[self._task.remote(self._src, jobs[i], self.device, self.threads)] = i
            return True

        def finished() -> list[tuple[int, JobResult]]:
            ready, _ = ray.wait(list(self._refs), num_returns=1)
            out = []
            for ref in ready:
                i = self._refs.pop(ref)
                out.append((i, self._get(ref, jobs[i])))
            return out

        return in_order(len(jobs), start, finished, self.ahead)

    def _get(self, ref, job: TensorJob) -> JobResult:
        from ray.exceptions import RayError, RayTaskError

        try:
            header, arr = self.ray.get(ref)
        except RayTaskError as e:
            if isinstance(e.cause, LplrError):
                raise e.cause from None
            raise WorkerError(f"the Ray task for {job.name} failed ({type(e.cause).__name__}: "
                              f"{str(e.cause)[:200]}); the output is incomplete: re-run with {opt('resume')}") from None
        except RayError as e:
            raise WorkerError(f"the Ray task for {job.name} was lost ({type(e).__name__}) after {self.retries} "
                              f"retries; the output is incomplete: re-run with {opt('resume')}") from None
        return unpack_result(header, bytearray(memoryview(arr)))
