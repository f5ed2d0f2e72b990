"""Whether calibration statistics cover the inputs they describe, and whether a calibrated result is worse than an
uncalibrated one could be.

A statistic H = E[x x^T] of a d-wide input averaged over t tokens has rank at most t. With t < d, H is singular: a
calibrated method minimises the output error on the t seen directions only and may move the weight arbitrarily
along the rest, so its output error on the calibration text looks fine while other inputs see a damaged weight
(MiniLM calibrated on 4 samples: 83 tokens for 384-wide inputs; lplr then stored weight errors up to 6.9). This is
told once, naming the statistics, at `calibrate` and at `convert --calibration` (`warn_thin_statistics`).

The result check (`worse_than_uncalibrated`) is one comparison per tensor, on the weight error the record already
holds (no second, uncalibrated run): a relative weight error above 1 means the stored weight is further from W (in
Frobenius norm) than the zero matrix. The uncalibrated reference of a factored method, the truncated SVD of the same
rank, always has error sqrt(tail energy) / ||W|| < 1 for any rank >= 1, so such a result is worse than the
uncalibrated form by construction; and for any method, a weight no closer than zero is worth naming. Such a result is
named in a warning; the tensor is kept as computed (the run does as asked). The rule is one-sided: a calibrated
result between the uncalibrated error and 1 passes silently.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from loguru import logger

__all__ = ["thin_statistics", "warn_thin_statistics", "worse_than_uncalibrated"]

_SHOWN = 3


def thin_statistics(statistics: Mapping[str, Mapping]) -> list[tuple[str, int, int]]:
    """(key, tokens, input width) of every statistic averaged over fewer tokens than its input width (rank-deficient
    by construction), widest shortfall first; `statistics` maps keys to records with "shape" and "tokens"."""
    thin = []
    for key, rec in statistics.items():
        shape, tokens = rec.get("shape") or [0], int(rec.get("tokens") or 0)
        if tokens < int(shape[-1]):
            thin.append((key, tokens, int(shape[-1])))
    return sorted(thin, key=lambda t: (t[1] / max(t[2], 1), t[0]))


def warn_thin_statistics(statistics: Mapping[str, Mapping], where: str, keys: Iterable[str] | None = None) -> bool:
    """Warn once (naming up to three) when statistics of `keys` (default: all) are rank-deficient for want of tokens;
    `where` names the STATS directory. Returns whether it warned."""
    chosen = statistics if keys is None else {k: statistics[k] for k in set(keys) if k in statistics}
    thin = thin_statistics(chosen)
    if not thin:
        return False
    shown = ", ".join(f"{k} ({t} tokens for {w} inputs)" for k, t, w in thin[:_SHOWN])
    more = f" and {len(thin) - _SHOWN} more" if len(thin) > _SHOWN else ""
    need = max(w for _, _, w in thin)
    logger.warning(f"rank-deficient calibration: {len(thin)} of {len(chosen)} statistics in {where} average fewer "
                   f"tokens than their input width: {shown}{more}; calibrated methods then fit only the directions "
                   f"seen and may damage the rest: calibrate with more --samples or a longer --seq-len (at least "
                   f"{need} tokens)")
    return True


def worse_than_uncalibrated(name: str, method: str, rel_error: float, tokens: int | None = None,
                            width: int | None = None) -> bool:
    """Warn, naming the tensor, when a calibrated result's relative weight error exceeds 1 (see the module
    docstring: further from W than the zero matrix, and than the truncated SVD of any rank). Returns whether it
    warned."""
    if not rel_error > 1.0:
        return False
    thin = f"; its statistic averages {tokens} tokens for {width} inputs" if tokens is not None and width and \
        tokens < width else ""
    logger.warning(f"{name}: calibrated {method} stored a weight {rel_error:.3g} x the weight's norm away from it, "
                   f"further than the zero matrix (1) and than the uncalibrated truncated SVD of any rank{thin}; "
                   "calibrate with more samples, or convert without --calibration")
    return True
