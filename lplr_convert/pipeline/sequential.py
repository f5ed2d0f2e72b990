"""Sequential calibration: each block's statistics taken from the outputs of the blocks before it as they will be
after conversion (compressed, then decoded as a loader decodes them), as llm-compressor's sequential pipeline does.

`CompressedBlocks(opts)` is the `calibration.run.BlockTransform` of a conversion's plan: calibrate runs block i on the
calibration text, measures its statistics, hands its weights and statistics to it, and feeds block i + 1 with the
outputs of block i carrying the decoded compressed weights. Converting afterwards with the same options and these
statistics compresses each weight exactly as the transform did (same plan, seed and statistic), so what the next
block saw during calibration is what it sees in the converted model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..calibration import calibrate
from ..devices import resolve_device
from ..errors import LplrError, opt
from ..io.output import decode_record
from ..io.reader import open_source
from ..methods.base import InputStats
from .convert import ConvertOptions, plan_options
from .plan import make_plan
from .task import TensorJob, run_job

__all__ = ["CompressedBlocks", "calibrate_sequential"]


class CompressedBlocks:
    """Block weights -> what the conversion `opts` stores for them, decoded (a `calibration.run.BlockTransform`);
    weights the plan copies stay as they are."""

    def __init__(self, opts: ConvertOptions):
        if opts.target_bits_per_param is not None:
            raise LplrError(f"sequential calibration with {opt('target_bits_per_param')} is not supported yet (the "
                            f"budget is allocated from the statistics it would produce); pass fixed settings")
        popts, recipe_text = plan_options(opts)
        src = open_source(opts.in_path, opts.revision)
        self.plans = {p.name: p for p in make_plan(src.headers.values(), src.config, popts)}
        self.seed, self.on_nonfinite = opts.seed, opts.on_nonfinite
        self.device = resolve_device(opts.device)
        # what decides the compressed weights (the plan's inputs): a conversion with other settings would not
        # compress as this calibration assumed
        self.record = {"method": popts.settings.method, "settings": popts.settings.to_json(), "recipe": recipe_text,
                       "include": opts.include, "exclude": opts.exclude, "layers": opts.layers, "types": opts.types,
                       "seed": opts.seed}

    def __call__(self, weights: dict[str, torch.Tensor], statistics: dict[str, torch.Tensor]
                 ) -> dict[str, torch.Tensor]:
        out, shared = {}, {}
        for name, W in weights.items():
            plan = self.plans.get(name)
            if plan is None or plan.method == "copy":
                continue
            H = statistics[name]
            stats = shared.setdefault(id(H), InputStats(H.to(self.device), key=str(id(H))))  # q/k/v share one
            res = run_job(TensorJob(plan, self.seed, self.on_nonfinite), W.to(plan.dtype).cpu(), self.device, stats)
            parts = {("" if full == name else full[len(name) + 1:]): t for full, t in res.stored.items()}
            out[name] = decode_record(res.record, parts)
        return out


def calibrate_sequential(opts: ConvertOptions, stats_out: str | Path, **kwargs) -> dict:
    """`calibrate(opts.in_path, stats_out, **kwargs)` with each block's weights compressed as `opts` converts them
    before its outputs feed the next block; then `convert(opts)` with `calibration=stats_out` converts as calibrated."""
    return calibrate(opts.in_path, stats_out, sequential=CompressedBlocks(opts), **kwargs)
