"""The executor that compresses in the driving process (the default): one tensor at a time, the next one read in
the background on CUDA."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing

import torch

from ...io.prefetch import prefetched
from ...io.reader import SourceCheckpoint
from ..task import JobResult, TensorJob, run_job

__all__ = ["InProcess"]


class InProcess:
    """Runs every job here, on one device, in the reader's order (which is the plan's); with `threads`, torch uses
    that many threads meanwhile (restored afterwards); `stats_for(plan)` gives a tensor's calibration statistics."""

    def __init__(self, src: SourceCheckpoint, device: torch.device, threads: int | None = None, stats_for=None):
        self.src, self.device, self.threads, self.stats_for = src, device, threads, stats_for
        self._saved: int | None = None

    def __enter__(self):
        if self.threads is not None:
            self._saved = torch.get_num_threads()
            torch.set_num_threads(self.threads)
        return self

    def __exit__(self, *exc) -> bool:
        if self._saved is not None:
            torch.set_num_threads(self._saved)
        return False

    def run(self, jobs: list[TensorJob]) -> Iterator[JobResult]:
        by_name = {j.name: j for j in jobs}
        cuda = self.device.type == "cuda"
        # closing(): the reader thread stops and its file closes as soon as this generator is closed or fails,
        # whether or not the interpreter collects the prefetching generator at once.
        with closing(prefetched(self.src.iter_tensors(list(by_name), pin=cuda), enabled=cuda, pin=cuda)) as items:
            for name, t in items:
                job = by_name[name]
                yield run_job(job, t, self.device, None if self.stats_for is None else self.stats_for(job.plan))
                del t
