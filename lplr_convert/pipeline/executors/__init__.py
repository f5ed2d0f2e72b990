"""Where a conversion's per-tensor work runs: in this process, in a pool of local worker processes, or on a Ray
cluster. Every executor yields the tensors' results in plan order, so that the one writer (`convert._Run`, in the
driving process) writes the same shards, names and bytes whichever executor computed them.
"""

from __future__ import annotations

from ...errors import LplrError

__all__ = ["WorkerError"]


class WorkerError(LplrError):
    """A worker (process or Ray task) died or failed outside the tool's own checks; nothing was marked complete."""
