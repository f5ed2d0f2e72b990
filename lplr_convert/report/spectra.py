"""Normalized singular-value energy curves: the format the report stores, computing them on the compute device during a
conversion (from what the method computed, or exactly), and from a source checkpoint afterwards.

A curve is a list `c` of P floats in [0, 1]: c[j] is the fraction of sum(sigma^2) held by the top
ceil((j + 1) / P * min(m, n)) singular values, so c[j] sits at kept-rank fraction (j + 1) / P and c[-1] == 1.

A tensor's spectrum, as its record stores it: {"kind", "curve", "upper", "exact_to"}. kind "exact": every singular
value, from the Gram matrix in W's precision (the curve is exact to ~1e-4, see `math.svd.singular_values`). kind
"svd": the top k singular values the method computed anyway (lsvd, dsvd, laser): the curve is exact up to rank
fraction `exact_to` = k / min(m, n); beyond it only ||W||_F^2 is known, so `curve` is the chord to (1, 1), a lower
bound (the true curve is concave), and `upper` the bound E_k + (j - k) sigma_k^2 / ||W||_F^2 (no later sigma exceeds
sigma_k): the true curve lies between the two.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from loguru import logger

__all__ = ["CURVE_POINTS", "SPECTRA_MODES", "bounded_curve", "energy_curve", "representative_tensors",
           "source_spectra", "tensor_spectrum"]

CURVE_POINTS = 200
SPECTRA_MODES = ("estimate", "exact", "off")
_TYPE_PREFERENCE = ("fc_in", "q_proj", "fc_out", "v_proj", "fc_up", "out_proj", "k_proj")  # MLP and attention alike
_MAX_DIM = 16384  # skip spectra of matrices whose smaller side exceeds this (Gram eigendecomposition too costly)


def _sampled_ranks(full: int, points: int) -> list[int]:
    """The ranks (1-based) a curve of a matrix with `full` singular values is sampled at."""
    if full <= points:
        return list(range(1, full + 1))
    return [math.ceil((j + 1) * full / points) for j in range(points)]


def _rounded(values) -> list[float]:
    return [round(float(v), 6) for v in values]


def energy_curve(singular_values, points: int = CURVE_POINTS) -> list[float]:
    """Cumulative normalized energy of descending singular values, sampled at up to `points` rank fractions."""
    s = torch.as_tensor(singular_values, dtype=torch.float64).flatten().cpu()
    if s.numel() == 0:
        raise ValueError("energy_curve needs at least one singular value")
    s2 = s.square().sort(descending=True).values
    cum = torch.cumsum(s2, 0) / s2.sum().clamp_min(torch.finfo(torch.float64).tiny)
    return _rounded(cum[torch.tensor(_sampled_ranks(cum.numel(), points)) - 1])


def bounded_curve(top: torch.Tensor, total_energy: float, full: int, points: int = CURVE_POINTS) -> dict:
    """The spectrum record of a matrix with `full` singular values of which the top ones, `top`, are known, and
    sum(sigma^2) = `total_energy`: kind "svd", exact to rank len(top), bracketed beyond it (see the module doc)."""
    s2 = top.detach().double().cpu().square().sort(descending=True).values
    k = s2.numel()
    if not 1 <= k <= full:
        raise ValueError(f"{k} singular values of a matrix with {full}")
    total = max(float(total_energy), float(s2.sum()), torch.finfo(torch.float64).tiny)
    cum = (torch.cumsum(s2, 0) / total).tolist()
    top_energy, last = cum[-1], float(s2[-1]) / total
    lower, upper = [], []
    for rank in _sampled_ranks(full, points):
        if rank <= k:
            lower.append(cum[rank - 1])
            upper.append(cum[rank - 1])
        else:
            lower.append(top_energy + (1.0 - top_energy) * (rank - k) / (full - k))
            upper.append(min(1.0, top_energy + (rank - k) * last))
    return {"kind": "svd", "curve": _rounded(lower), "upper": _rounded(upper), "exact_to": round(k / full, 6)}


def tensor_spectrum(mode: str, W: torch.Tensor, method_spectrum: torch.Tensor | None,
                    points: int = CURVE_POINTS) -> dict | None:
    """The spectrum record of weight W (on the compute device) for spectra `mode`: "exact" computes every singular
    value (a Gram matrix and its eigenvalues, in W's precision); "estimate" reuses the singular values the method
    computed (`method_spectrum`) and computes nothing else but ||W||_F^2, or gives None when there are none."""
    from ..math.error import frobenius_sq
    from ..math.svd import singular_values

    if mode == "exact":
        return {"kind": "exact", "curve": energy_curve(singular_values(W.float(), precise=False), points),
                "upper": None, "exact_to": 1.0}
    if mode == "estimate" and method_spectrum is not None and method_spectrum.numel():
        return bounded_curve(method_spectrum, float(frobenius_sq(W, torch.float32)), min(W.shape), points)
    return None


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


def _check_unchanged(src, source: dict, files: set[str]) -> None:
    """The weight files `files` of the source are those the conversion read (the sha256 its manifest records), so a
    spectrum drawn from them is of the converted model; only the files read are hashed."""
    from ..errors import LplrError
    from ..io.manifest import sha256_file

    recorded = source.get("files") if isinstance(source.get("files"), dict) else {}
    for rel in sorted(files):
        if rel in recorded and sha256_file(src.root / rel) != recorded[rel]:
            raise LplrError(f"the source at {src.root} was replaced since the conversion (its {rel} differs from the "
                            f"sha256 the manifest records), so its spectra are not this model's")


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
    _check_unchanged(src, manifest.source, {src.headers[n].file for n in wanted})
    out = {name: energy_curve(singular_values(W.float(), precise=False), points)  # a plot: W's precision
           for name, W in src.iter_tensors(wanted)}
    if len(out) < len(names):
        logger.debug(f"spectra: {len(names) - len(out)} tensor(s) not found or too large in the source at {path}")
    return {n: out[n] for n in names if n in out}
