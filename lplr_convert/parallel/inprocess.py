"""The executor that compresses in the driving process (the default): one tensor at a time, the next one read in
the background on CUDA."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..io.prefetch import prefetched
from ..io.reader import SourceCheckpoint
from .task import JobResult, TensorJob, run_job

__all__ = ["InProcess"]


class InProcess:
    """Runs every job here, on one device, in the reader's order (which is the plan's); with `threads`, torch uses
    that many threads meanwhile (restored afterwards)."""

    def __init__(self, src: SourceCheckpoint, device: torch.device, threads: int | None = None):
        self.src, self.device, self.threads = src, device, threads
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
        for name, t in prefetched(self.src.iter_tensors(list(by_name), pin=cuda), enabled=cuda, pin=cuda):
            yield run_job(by_name[name], t, self.device)
            del t
