"""One validated settings object per method invocation, and the rank policies."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from ..errors import LplrError
from ..math.quantize import ALLOWED_BITS, GRANULARITIES
from ..math.sketch import SKETCHES
from ..math.svd import SVD_METHODS

RANK_POLICIES = ("rank_fraction", "rank", "bits_per_param", "energy", "rho", "rate")

__all__ = ["RANK_POLICIES", "MethodSettings", "RankPolicy", "resolve_rank"]


@dataclass(frozen=True)
class RankPolicy:
    """How the kept rank r of an m x n matrix is chosen.

    rank_fraction f: r = ceil(f * min(m, n)) (the published scripts); rank: r itself; bits_per_param B: the largest r
    whose stored bits (codes and scales) fit in B * m * n; energy p: the fewest singular values holding a fraction p
    of sum(sigma^2); rho: r = int(rho * min(m, n)) (LASER); rate: rho = 1 - 0.1 * rate (LASER's legacy CLI).
    """

    kind: str = "rank_fraction"
    value: float = 0.8

    def __post_init__(self) -> None:
        if self.kind not in RANK_POLICIES:
            raise LplrError(f"rank policy {self.kind!r} is unknown; use one of {', '.join(RANK_POLICIES)}")
        v = self.value
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise LplrError(f"{self.kind} must be a finite number, got {v!r}")
        if self.kind in ("rank_fraction", "rho", "energy") and not 0 < v <= 1:
            raise LplrError(f"{self.kind}={v} is outside (0, 1]; pass a fraction such as 0.8")
        if self.kind == "rank" and (v < 1 or int(v) != v):
            raise LplrError(f"rank={v} must be a positive integer")
        if self.kind == "bits_per_param" and v <= 0:
            raise LplrError(f"bits_per_param={v} must be positive")
        if self.kind == "rate" and not 0 <= v < 10:
            raise LplrError(f"rate={v} is outside [0, 10); LASER's rate gives rho = 1 - 0.1 * rate")

    @property
    def needs_spectrum(self) -> bool:
        return self.kind == "energy"

    def label(self) -> str:
        return f"{self.kind}={self.value:g}"


def resolve_rank(policy: RankPolicy, m: int, n: int, bits_for_rank: Callable[[int], int] | None = None,
                 singular_values: Callable[[], torch.Tensor] | None = None) -> int:
    """The kept rank for an m x n matrix; raises LplrError when it falls outside 1..min(m, n)."""
    full = min(m, n)
    v = policy.value
    if policy.kind == "rank_fraction":
        r = math.ceil(v * full - 1e-9)
    elif policy.kind == "rank":
        r = int(v)
    elif policy.kind in ("rho", "rate"):
        rho = v if policy.kind == "rho" else 1 - 0.1 * v
        r = int(rho * full + 1e-9)
    elif policy.kind == "energy":
        if singular_values is None:
            raise LplrError("the energy rank policy needs the spectrum of the matrix, which this caller cannot give")
        s2 = singular_values().double().square()
        cum = torch.cumsum(s2, 0) / s2.sum().clamp_min(torch.finfo(torch.float64).tiny)
        r = int((cum < v - 1e-12).sum().item()) + 1
    else:  # bits_per_param
        if bits_for_rank is None:
            raise LplrError("rank policy bits_per_param only applies to methods that store quantized factors "
                            "(lplr, lsvd, dsvd); for laser use rho, rate, rank, rank_fraction or energy")
        budget = v * m * n
        lo, hi = 0, full
        while lo < hi:  # largest r with bits(r) <= budget; bits is increasing in r
            mid = (lo + hi + 1) // 2
            if bits_for_rank(mid) <= budget:
                lo = mid
            else:
                hi = mid - 1
        r = lo
        if r < 1:
            raise LplrError(f"bits_per_param={v:g} is too small for a {m}x{n} matrix: even rank 1 needs "
                            f"{bits_for_rank(1) / (m * n):.3f} bits/param; raise the budget or lower --b1/--b2")
    if not 1 <= r <= full:
        raise LplrError(f"{policy.label()} gives rank {r} for a {m}x{n} matrix, outside 1..{full}; "
                        f"choose a policy value that keeps at least one and at most {full} components")
    return min(r, full)


@dataclass(frozen=True)
class MethodSettings:
    """Everything a method needs, validated once. Bits: b1 (left factor), b2 (right factor), b0 (rtn)."""

    method: str = "lplr"
    b1: int = 8
    b2: int = 8
    b0: int = 8
    quantizer: str = "channel"
    group_size: int | None = None
    rank: RankPolicy = field(default_factory=RankPolicy)
    sketch: str = "gaussian"
    power_iters: int = 0
    svd: str = "auto"

    def __post_init__(self) -> None:
        from .base import get_method  # late: the registry imports this module

        get_method(self.method)
        for name in ("b1", "b2", "b0"):
            b = getattr(self, name)
            if isinstance(b, bool) or not isinstance(b, int) or b not in ALLOWED_BITS:
                raise LplrError(f"--{name} {b!r} is not supported; use one of 1-8 (integer codes), 16 (fp16/bf16) "
                                f"or 32 (fp32)")
        if self.quantizer not in GRANULARITIES:
            raise LplrError(f"--quantizer {self.quantizer!r} is unknown; use one of {', '.join(GRANULARITIES)}")
        if self.quantizer == "group":
            if self.group_size is None or self.group_size < 1:
                raise LplrError("--quantizer group needs --group-size (a positive integer such as 128)")
        elif self.group_size is not None:
            raise LplrError(f"--group-size only applies to --quantizer group (got --quantizer {self.quantizer})")
        if self.sketch not in SKETCHES:
            raise LplrError(f"--sketch {self.sketch!r} is unknown; use one of {', '.join(SKETCHES)}")
        if self.svd not in SVD_METHODS:
            raise LplrError(f"--svd {self.svd!r} is unknown; use one of {', '.join(SVD_METHODS)}")
        if self.power_iters < 0:
            raise LplrError("--power-iters must be >= 0")

    def to_json(self) -> dict:
        d = asdict(self)
        d["rank"] = {"kind": self.rank.kind, "value": self.rank.value}
        return d

    @classmethod
    def from_json(cls, d: dict) -> MethodSettings:
        d = dict(d)
        d["rank"] = RankPolicy(**d["rank"])
        return cls(**d)
