"""Settings as declarations: every knob of every method is a dataclass field whose metadata says its type, default,
choices and help. The command line, recipe keys, the manifest's settings and the report's labels are generated from
these declarations, so a method with a new knob declares it in its own module and nothing else changes.

Shared knobs (bit widths, the quantizer, the rank policy, the SVD route) are small dataclasses here that a method's
settings class inherits from (composition by inheritance keeps the knobs flat: `b1`, not `bits.b1`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import LplrError, opt
from ..math.hadamard import INCOHERENCE_KINDS
from ..math.quantize import ALLOWED_BITS, CLIPS, GRANULARITIES, SCALE_DTYPES, SCHEMES
from ..math.svd import SVD_METHODS

RANK_POLICIES = ("rank_fraction", "rank", "bits_per_param", "energy", "rho", "rate")
RANK_FIELD = "rank"  # the settings field holding the RankPolicy (flat vocabulary: one key per policy kind)

__all__ = [
    "RANK_FIELD",
    "RANK_HELP",
    "RANK_POLICIES",
    "BitsKnob",
    "FactorBits",
    "IncoherenceKnob",
    "QuantKnobs",
    "RankKnobs",
    "RankPolicy",
    "Settings",
    "SvdKnobs",
    "knob",
    "knob_fields",
    "non_negative",
    "resolve_rank",
]


def knob(default: Any, *, type: type, help: str, choices: tuple | None = None, optional: bool = False,
         label: str | None = "nondefault", validate: Callable[[str, Any], None] | None = None, section: str = "Method",
         reset_with: str | None = None):
    """A settings field with its declaration.

    type: int, float, bool or str (values are checked against it; a bool is never an int here); choices: allowed values;
    optional: None is allowed; label: how the report's and `inspect`'s short description shows it ("always",
    "nondefault" (the default: when it differs from the method's default) or None for never); validate(key, value): raises LplrError for a bad value; section: its group in `--help`; reset_with:
    another knob whose change (in a recipe rule) returns this one to its default unless the rule sets it too.
    """
    return field(default=default, metadata=_meta(type, help, choices, optional, label, validate, section,
                                                 reset_with=reset_with))


def redefault(group: type, name: str, default: Any = None, factory: Callable[[], Any] | None = None):
    """The knob `name` of a shared group with another default (or `factory` of it), for a method whose own default
    differs: a subclass declares `name: T = redefault(Group, "name", value)` (same type, choices and help; the CLI
    then shows each method's default)."""
    f = group.__dataclass_fields__[name]
    if factory is not None:
        return field(default_factory=factory, metadata=f.metadata)
    return field(default=default, metadata=f.metadata)


def _meta(type, help, choices=None, optional=False, label=None, validate=None, section="Method", **extra) -> dict:
    return {"knob": True, "type": type, "help": help, "choices": choices, "optional": optional, "label": label,
            "validate": validate, "section": section, **extra}


def _check_bits(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value not in ALLOWED_BITS:
        raise LplrError(f"{opt(key)} {value!r} is not supported; use one of 1-8 (integer codes), 16 (fp16/bf16) or "
                        f"32 (fp32)")


def non_negative(key: str, value: Any) -> None:
    """Validator of an integer knob that must be >= 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise LplrError(f"{opt(key)} {value!r} must be an integer >= 0")


# The most iterations an iteration-count knob accepts: each costs at least one matrix product of the weight, and the
# methods converge in a handful (a count like 1e9 would run for ever).
MAX_ITERATIONS = 100


def iteration_count(low: int) -> Callable[[str, Any], None]:
    """Validator of an iteration-count knob: an integer in low..MAX_ITERATIONS."""

    def check(key: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= MAX_ITERATIONS:
            raise LplrError(f"{opt(key)} {value!r} must be an integer from {low} to {MAX_ITERATIONS}")

    return check


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
        v, k = self.value, self.kind
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise LplrError(f"{opt(k)} must be a finite number, got {v!r}")
        if k in ("rank_fraction", "rho", "energy") and not 0 < v <= 1:
            raise LplrError(f"{opt(k)}={v} is outside (0, 1]; pass a fraction such as 0.8")
        if k == "rank" and (v < 0 or int(v) != v):
            raise LplrError(f"{opt(k)}={v} must be a non-negative integer (0 only for methods with a backbone)")
        if k == "bits_per_param" and v <= 0:
            raise LplrError(f"{opt(k)}={v} must be positive")
        if k == "rate" and not 0 <= v < 10:
            raise LplrError(f"{opt(k)}={v} is outside [0, 10); LASER's rate gives rho = 1 - 0.1 * rate")

    @property
    def needs_spectrum(self) -> bool:
        return self.kind == "energy"

    def label(self) -> str:
        return f"{self.kind}={self.value:g}"

    def to_json(self) -> dict:
        return {"kind": self.kind, "value": self.value}

    @classmethod
    def from_json(cls, d: Mapping) -> RankPolicy:
        return cls(d["kind"], d["value"])


def resolve_rank(policy: RankPolicy, m: int, n: int, bits_for_rank: Callable[[int], int] | None = None,
                 singular_values: Callable[[], torch.Tensor] | None = None, min_rank: int = 1) -> int:
    """The kept rank for an m x n matrix; raises LplrError when it falls outside min_rank..min(m, n) (min_rank 0
    for a method whose low-rank part is a correction of a full-size backbone)."""
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
        total = s2.sum()
        if bool(total > 0):
            r = int((torch.cumsum(s2, 0) / total < v - 1e-12).sum().item()) + 1
        else:  # an all-zero matrix: one component keeps all of its (zero) energy
            r = 1
    else:
        r = _rank_for_bits(v, m, n, bits_for_rank, min_rank)
    if not min_rank <= r <= full:
        raise LplrError(f"{policy.label()} gives rank {r} for a {m}x{n} matrix, outside {min_rank}..{full}; "
                        f"choose a policy value that keeps at least {max(min_rank, 1) if min_rank else 0} and at "
                        f"most {full} components")
    return r


def _rank_for_bits(budget_per_param: float, m: int, n: int, bits_for_rank: Callable[[int], int] | None,
                   min_rank: int = 1) -> int:
    """The largest r with bits(r) <= B m n (bits is increasing in r)."""
    if bits_for_rank is None:
        raise LplrError(f"rank policy {opt('bits_per_param')} only applies to methods that store quantized factors; "
                        f"for this method use {opt('rho')}, {opt('rate')}, {opt('rank')}, {opt('rank_fraction')} or "
                        f"{opt('energy')}")
    budget = budget_per_param * m * n
    lo, hi = 0, min(m, n)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if bits_for_rank(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    if lo < min_rank or bits_for_rank(lo) > budget:
        raise LplrError(f"{opt('bits_per_param')}={budget_per_param:g} is too small for a {m}x{n} matrix: even rank "
                        f"{min_rank} needs {bits_for_rank(min_rank) / (m * n):.3f} bits/param; raise the budget or "
                        f"lower the bit widths")
    return lo


def knob_fields(cls_or_obj) -> list[dataclasses.Field]:
    """The knob fields of a settings class (the rank policy included), in declaration order."""
    return [f for f in dataclasses.fields(cls_or_obj) if f.metadata.get("knob")]


def _check_value(f: dataclasses.Field, value: Any) -> None:
    meta = f.metadata
    if meta.get("rank_policy"):
        if not isinstance(value, RankPolicy):
            raise LplrError(f"{opt(f.name)} must be a rank policy ({', '.join(RANK_POLICIES)}), got {value!r}")
        return
    if value is None and meta["optional"]:
        return
    if meta["validate"] is not None:  # first: its message names the allowed values
        meta["validate"](f.name, value)
    t = meta["type"]
    if t is bool:
        ok = isinstance(value, bool)
    else:
        ok = not isinstance(value, bool) and (isinstance(value, t) or (t is float and isinstance(value, int)))
    if not ok:
        what = {int: "an integer", float: "a number", bool: "true or false"}.get(t, "text")
        raise LplrError(f"{opt(f.name)} must be {what}, got {value!r}")
    if meta["choices"] is not None and value not in meta["choices"]:
        raise LplrError(f"{opt(f.name)} {value!r} is unknown; use one of {', '.join(map(str, meta['choices']))}")


@dataclass(frozen=True)
class Settings:
    """Base of every method's settings: the method's name plus knobs, validated once on creation.

    A knob group may define `_check(self)` for rules across its knobs; every `_check` in the class hierarchy runs.
    """

    method: str = ""

    def __post_init__(self) -> None:
        for f in knob_fields(self):
            _check_value(f, getattr(self, f.name))
        for klass in type(self).__mro__:
            check = klass.__dict__.get("_check")
            if check is not None:
                check(self)

    def knobs(self) -> dict[str, Any]:
        """Knob name -> value (the rank policy as a RankPolicy)."""
        return {f.name: getattr(self, f.name) for f in knob_fields(self)}

    def to_json(self) -> dict:
        """{"method", knobs...} with the rank policy as {"kind", "value"}."""
        out: dict[str, Any] = {"method": self.method}
        for k, v in self.knobs().items():
            out[k] = v.to_json() if isinstance(v, RankPolicy) else v
        return out

    @classmethod
    def from_json(cls, d: Mapping) -> Settings:
        """Inverse of `to_json`; keys the class does not declare are ignored (older or newer records)."""
        names = {f.name: f for f in knob_fields(cls)}
        values = {}
        for k, v in d.items():
            if k in names:
                values[k] = RankPolicy.from_json(v) if names[k].metadata.get("rank_policy") else v
        return cls(method=d.get("method", ""), **values)

    def label(self) -> str:
        """A short description for reports, e.g. "lplr rank_fraction=0.8 b1=8 b2=8"."""
        parts = [self.method]
        for f in knob_fields(self):
            value, how = getattr(self, f.name), f.metadata.get("label")
            if isinstance(value, RankPolicy):
                parts.append(value.label())
            elif how == "always" or (how == "nondefault" and value != f.default):
                parts.append(f"{f.name}={value}")
        return " ".join(parts)


# ------------------------------------------------------------------------------------------- shared knob groups


@dataclass(frozen=True)
class FactorBits(Settings):
    """Bit widths of the left (m x r) and right (r x n) factors."""

    b1: int = knob(8, type=int, validate=_check_bits, label="always", help="Bits of the left factor L (1-8, 16, 32).")
    b2: int = knob(8, type=int, validate=_check_bits, label="always", help="Bits of the right factor R (1-8, 16, 32).")


@dataclass(frozen=True)
class BitsKnob(Settings):
    """Bit width of a directly quantized full-size matrix."""

    b0: int = knob(8, type=int, validate=_check_bits, label="always",
                   help="Bits of a directly quantized weight (rtn) (1-8, 16, 32).")


# The grid of the calibrated quantizers (gptq, qlr's backbone and factors), a named default chosen by measurement: an
# integer zero point per scale group and each group's range shrunk to the least squared error. Better than the
# symmetric absmax grid at 2.25-8.25 bits/param on all-MiniLM-L6-v2 and, GPTQ on three blocks of SmolLM2-135M-Instruct,
# at 4 bits (equal perplexity, lower KL at 3) (artifacts/quality/results.md, artifacts/quality/decoder/NOTES.md);
# each tensor's record carries its grid (settings and the stored part's spec).
GRID_SCHEME = "asymmetric"
GRID_CLIP = "mse"


@dataclass(frozen=True)
class QuantKnobs(Settings):
    """Scale granularity of the integer quantizer."""

    quantizer: str = knob("channel", type=str, choices=GRANULARITIES, label="nondefault",
                          help="Scale granularity: tensor (published min-max), channel, or group.")
    group_size: int | None = knob(None, type=int, optional=True, label="nondefault", reset_with="quantizer",
                                  help="Group size along the input dim (with quantizer group); a size at least a matrix's width "
                                       "makes one group per row.")
    scheme: str = knob("asymmetric", type=str, choices=SCHEMES, label="nondefault",
                       help="Integer grid: minmax (published: float zero, 0 not representable), symmetric (absmax), "
                            "asymmetric (integer zero point).")
    scale_dtype: str = knob("float16", type=str, choices=SCALE_DTYPES, label="nondefault",
                            help="Stored scale dtype of symmetric/asymmetric grids (minmax always stores float32).")
    clip: str | None = knob(None, type=str, choices=CLIPS, optional=True, label="nondefault",
                            help="Range clipping: mse searches each scale group's shrink factor (not with minmax).")

    def _check(self) -> None:
        if self.scheme == "minmax" and self.clip is not None:
            raise LplrError(f"{opt('clip')} {self.clip} needs {opt('scheme')} symmetric or asymmetric (the published "
                            f"minmax grid does not clip)")
        if self.quantizer == "group":
            if self.group_size is None or self.group_size < 1:
                raise LplrError(f"{opt('quantizer')} group needs {opt('group_size')} (a positive integer such as 128)")
        elif self.group_size is not None:
            if self.group_size == type(self).__dataclass_fields__["group_size"].default:  # a method's own default
                object.__setattr__(self, "group_size", None)  # (e.g. gptq's 128) does not apply to other granularities
                return
            raise LplrError(f"{opt('group_size')} only applies to {opt('quantizer')} group (got {opt('quantizer')} "
                            f"{self.quantizer})")


def _positive_fraction(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise LplrError(f"{opt(key)} {value!r} must be a number in [0, 1), e.g. 0.01")


def positive_int(key: str, value: Any) -> None:
    """Validator of an integer knob that must be >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LplrError(f"{opt(key)} {value!r} must be a positive integer")


@dataclass(frozen=True)
class GPTQKnobs(Settings):
    """How quantization uses calibration statistics (GPTQ): used by every method that quantizes against H."""

    damp: float = knob(0.01, type=float, validate=_positive_fraction, label="nondefault",
                       help="GPTQ damping, as a fraction of H's mean diagonal (with calibration).")
    act_order: bool = knob(False, type=bool, label="nondefault",
                           help="GPTQ: quantize columns by decreasing H_ii (static groups; with calibration).")
    block_size: int = knob(128, type=int, validate=positive_int, label=None,
                           help="GPTQ: columns updated together (lazy batch updates).")


@dataclass(frozen=True)
class IncoherenceKnob(Settings):
    """Incoherence processing of a full-size quantized backbone (gptq, qlr)."""

    incoherence: str = knob("none", type=str, choices=INCOHERENCE_KINDS, label="nondefault",
                            help="gptq/qlr: quantize W' = U W V^T, U and V seeded randomized Hadamard transforms "
                                 "(QuIP#; the per-tensor seed is recorded, loaders undo it); none (the default) or "
                                 "hadamard.")


# Help of each rank policy's option (the CLI offers one option per policy kind; a recipe one key per kind).
RANK_HELP = {
    "rank_fraction": ("r = ceil(f * min(m, n)) [default 0.8].", float),
    "rank": ("Fixed rank r.", int),
    "bits_per_param": ("Largest r whose stored bits (scales included) fit this budget.", float),
    "energy": ("Fewest components holding this fraction of sum(sigma^2).", float),
    "rho": ("LASER: kept rank int(rho * min(m, n)).", float),
    "rate": ("LASER legacy: rho = 1 - 0.1 * rate.", float),
}


@dataclass(frozen=True)
class RankKnobs(Settings):
    """The kept rank (one of the RANK_POLICIES)."""

    rank: RankPolicy = field(default_factory=RankPolicy, metadata=_meta(RankPolicy, "The rank policy.", rank_policy=True,
                                                                        section="Rank policy (one of)"))


@dataclass(frozen=True)
class SvdKnobs(Settings):
    """The truncated SVD route."""

    svd: str = knob("auto", type=str, choices=SVD_METHODS, label=None, help="Truncated SVD route (lsvd, dsvd, laser).")
