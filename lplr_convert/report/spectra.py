"""Normalized singular-value energy curves: the format the report stores, and computing them from a source checkpoint.

A curve is a list `c` of P floats in [0, 1]: c[j] is the fraction of sum(sigma^2) held by the top
ceil((j + 1) / P * min(m, n)) singular values, so c[j] sits at kept-rank fraction (j + 1) / P and c[-1] == 1.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from loguru import logger

__all__ = ["CURVE_POINTS", "energy_curve", "representative_tensors", "source_spectra"]

CURVE_POINTS = 200
_TYPE_PREFERENCE = ("fc_in", "q_proj", "fc_out", "v_proj", "fc_up", "out_proj", "k_proj")  # MLP and attention alike
_MAX_DIM = 16384  # skip spectra of matrices whose smaller side exceeds this (Gram eigendecomposition too costly)


def energy_curve(singular_values, points: int = CURVE_POINTS) -> list[float]:
    """Cumulative normalized energy of descending singular values, sampled at up to `points` rank fractions."""
    s = torch.as_tensor(singular_values, dtype=torch.float64).flatten()
    if s.numel() == 0:
        raise ValueError("energy_curve needs at least one singular value")
    s2 = s.square().sort(descending=True).values
    cum = torch.cumsum(s2, 0) / s2.sum().clamp_min(torch.finfo(torch.float64).tiny)
    full = cum.numel()
    if full > points:
        idx = torch.tensor([math.ceil((j + 1) * full / points) - 1 for j in range(points)])
        cum = cum[idx]
    return [round(float(v), 6) for v in cum]


def representative_tensors(rows: list[dict], k: int = 4) -> list[str]:
    """Up to k compressed 2-D block tensors spread over matrix types and layers (first, last, middle layers)."""
    cands = [r for r in rows if r["method"] != "copy" and len(r["shape"]) == 2 and r["layer"] is not None]
    if not cands:
        cands = [r for r in rows if r["method"] != "copy" and len(r["shape"]) == 2]
        return [r["name"] for r in cands[:k]]
    present = list(dict.fromkeys(r["matrix_type"] for r in cands))
    types = [t for t in _TYPE_PREFERENCE if t in present] + [t for t in present if t not in _TYPE_PREFERENCE]
    layers = sorted({r["layer"] for r in cands})
    order = list(dict.fromkeys([layers[0], layers[-1], layers[len(layers) // 2], *layers]))
    chosen: list[str] = []
    for i in range(len(cands)):
        if len(chosen) >= k:
            break
        t, want = types[i % len(types)], order[i % len(order)]
        pool = [r for r in cands if r["matrix_type"] == t and r["name"] not in chosen]
        if pool:
            chosen.append(min(pool, key=lambda r: (abs(r["layer"] - want), r["layer"]))["name"])
    return chosen


def source_spectra(manifest, names: list[str], points: int = CURVE_POINTS) -> dict[str, list[float]]:
    """Energy curves of `names` read from the source checkpoint, when its local path is still reachable."""
    from ..io.reader import open_source
    from ..math.svd import singular_values

    path = manifest.source.get("path")
    if not path or not Path(path).exists():
        return {}
    src = open_source(path)
    wanted = [n for n in names if n in src.headers and len(src.headers[n].shape) == 2
              and min(src.headers[n].shape) <= _MAX_DIM]
    out = {name: energy_curve(singular_values(W.float(), precise=False), points)  # a plot: W's precision
           for name, W in src.iter_tensors(wanted)}
    if len(out) < len(names):
        logger.debug(f"spectra: {len(names) - len(out)} tensor(s) not found or too large in the source at {path}")
    return {n: out[n] for n in names if n in out}
