"""`inspect`: what a checkpoint holds, what each tensor would get, and the predicted output size: the run's own plan
(`convert`'s plan and allocation code), computing no compression."""

from __future__ import annotations

import math

from ..devices import resolve_device
from ..dtypes import dtype_from_name, dtype_name
from ..io.reader import open_source
from ..methods import get_method
from ..methods._common import BACKBONES
from .convert import StatsFor, allocated, hash_sources, open_stats, plan_options
from .plan import TensorPlan, make_plan

__all__ = ["inspect_checkpoint"]

_HEADER_BYTES_PER_ENTRY = 90  # a safetensors header entry beside its name and shape digits (measured on our shards)


def _predicted(p: TensorPlan, calibrated: bool) -> tuple[int | None, dict]:
    if p.method == "copy":
        return None, {"": (dtype_name(p.dtype), p.shape)}
    rank, specs = get_method(p.method).predict(p.oriented_shape, p.dtype, p.settings, calibrated)
    if p.experts:  # one set of parts per expert, "<e>.<part>"
        specs = {f"{e}.{k}" if k else str(e): v for e in range(p.experts) for k, v in specs.items()}
    return rank, specs


def _row(p: TensorPlan, calibrated: bool) -> tuple[dict, int]:
    """The row of one tensor and the header bytes its stored tensors add."""
    rank, specs = _predicted(p, calibrated)
    nbytes = sum(math.prod(shp) * dtype_from_name(dt).itemsize for dt, shp in specs.values())
    header = sum(_HEADER_BYTES_PER_ENTRY + len(p.name) + len(suffix) + 8 * len(shp)
                 for suffix, (_, shp) in specs.items())
    orig = math.prod(p.shape) * p.dtype.itemsize
    row = {"name": p.name, "shape": list(p.shape), "dtype": dtype_name(p.dtype), "method": p.method,
           "label": p.settings.label() if p.method != "copy" else "copy", "settings": p.settings.to_json(),
           "layer": p.layer, "matrix_type": p.matrix_type, "rank": rank, "reason": p.reason, "original_bytes": orig,
           "predicted_bytes": nbytes if specs else None, "grows": bool(specs) and nbytes > orig}
    return row, header


def inspect_checkpoint(options) -> dict:
    """The plan of `options` (a ConvertOptions; its out_path is not used) over the checkpoint at its in_path, with
    each tensor's method, settings, predicted rank and stored size, and the predicted output size. It is the plan
    `convert` makes: with `target_bits_per_param` the global allocation reads every compressed tensor once (and the
    calibration statistics), as the conversion does before compressing."""
    popts, _ = plan_options(options)
    src = open_source(options.in_path, options.revision)
    plans = make_plan(src.headers.values(), src.config, popts)
    if options.target_bits_per_param is not None:
        device = resolve_device(options.device_list()[0])
        stats = open_stats(options.calibration, plans, hash_sources(src), src, device)
        try:
            plans, _ = allocated(options, popts, src, plans, device, StatsFor(stats, device))
        finally:
            BACKBONES.clear()  # kept for a conversion that does not follow
    rows, header_bytes = [], 0
    for p in plans:
        row, header = _row(p, options.calibration is not None)
        rows.append(row)
        header_bytes += header
    predicted = sum(r["predicted_bytes"] or 0 for r in rows)
    side = sum(f.stat().st_size for f in src.side_files())
    return {"source": str(src.root), "kind": src.kind, "files": src.files, "model_type": src.config.get("model_type"),
            "tensors": rows, "original_bytes": sum(r["original_bytes"] for r in rows),
            "predicted_tensor_bytes": predicted, "predicted_output_bytes": predicted + header_bytes + side,
            "exact": all(r["predicted_bytes"] is not None for r in rows),
            "n_compressed": sum(r["method"] != "copy" for r in rows)}
