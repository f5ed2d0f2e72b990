"""The method registry, the result every method returns, and settings built from the flat knob vocabulary.

The flat vocabulary is what the command line and recipes speak: one key per knob (`b1`, `quantizer`, ...) plus one
key per rank policy kind (`rank_fraction`, `rho`, ...). `make_settings(method, **values)` turns it into the
method's own settings object; `all_knobs()` lists every key that some registered method declares.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import constants as C
from ..errors import LplrError, opt
from ..math import quantize as qz
from ..math.hadamard import Incoherence
from .settings import RANK_FIELD, RANK_POLICIES, RankPolicy, Settings, knob_fields

__all__ = ["Candidate", "InputStats", "Method", "MethodResult", "PackedLayout", "QuantPart", "all_knobs",
           "available_methods", "flat_defaults", "get_method", "incoherence_of", "knob_defaults", "layer_json",
           "make_settings", "overlay", "part_fields", "register", "settings_from_flat", "unregister"]

_REGISTRY: dict[str, Method] = {}


@dataclass
class MethodResult:
    """What a method produced for one weight.

    parts: stored-name suffix -> tensor ("" means the weight's own name); info: JSON-able facts `decode` needs;
    stored_bits: exact bits on disk of every part; rel_error: ||W - W_hat||_F / ||W||_F of what is stored, or None
    with `error_fn` computing it on first use of `error()` (a method whose estimate costs real time defers it: the
    conversion measures what a loader returns instead and drops `error_fn`);
    energy_kept: fraction of sum(sigma^2) in the kept components, where known; extra: further JSON-able facts for
    the tensor's record (method-specific); spectrum: singular values of W the method computed anyway (descending, the
    top ones or all, on the compute device), which the report's default spectra reuse; None when it computed none.
    """

    parts: dict[str, torch.Tensor]
    info: dict
    stored_bits: int
    rel_error: torch.Tensor | float | None
    rank: int | None = None
    energy_kept: torch.Tensor | float | None = None
    extra: dict = field(default_factory=dict)
    spectrum: torch.Tensor | None = None
    error_fn: Callable[[], torch.Tensor | float] | None = None

    def error(self) -> float:
        """rel_error as a float, computed by `error_fn` the first time when the method deferred it."""
        if self.rel_error is None:
            if self.error_fn is None:
                raise ValueError("the relative error was neither computed nor deferred")
            self.rel_error, self.error_fn = self.error_fn(), None
        return float(self.rel_error)


@dataclass(frozen=True)
class Candidate:
    """One choice of a global bit budget for a weight (see `Method.candidates`)."""

    changes: dict
    bits: int
    error: float


def part_fields(part: str, parts: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The stored fields of one part of a weight, keyed by field name ("" for a float part stored under the part's
    own suffix): {"packed": ..., "scale": ..., "zero_point": ...} of "<part>.<field>" suffixes."""
    out = {}
    for suffix, t in parts.items():
        if suffix == part:
            out[""] = t
        elif suffix.startswith(part + "."):
            out[suffix[len(part) + 1:]] = t
    return out


@dataclass(frozen=True)
class QuantPart:
    """One stored matrix of a weight: its part name (`constants.PART_*`) and how it is stored (`QuantSpec`: integer
    codes of 1-8 bits with their scales and zero points, or a 16/32-bit float matrix)."""

    part: str
    spec: qz.QuantSpec

    @classmethod
    def of(cls, part: str, spec_json: Mapping | None) -> QuantPart | None:
        """The part stored by `spec_json` (a `QuantSpec.to_json`), None for None; ValueError naming the part when the
        spec is malformed."""
        if spec_json is None:
            return None
        try:
            return cls(part, qz.QuantSpec.from_json(dict(spec_json)))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"the quantizer spec of {part} is invalid ({type(e).__name__}: {e})") from None

    def fields(self, parts: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This part's stored fields among a weight's `parts` (suffix -> tensor)."""
        return part_fields(self.part, parts)

    def quantized(self, parts: Mapping[str, torch.Tensor]) -> qz.Quantized:
        """The stored codes and parameters, checked against the spec (`math.quantize.from_fields`)."""
        return qz.from_fields(self.fields(parts), self.spec)

    def dequantized(self, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The float32 matrix this part decodes to."""
        return qz.dequantize(self.quantized(parts))


def incoherence_of(info: Mapping, shape: tuple[int, int]) -> Incoherence | None:
    """The incoherence transform a record's `info` holds (`constants.INFO_INCOHERENCE`) for an (out x in) weight of
    `shape`, None when it holds none; ValueError naming the problem when it is malformed."""
    spec = info.get(C.INFO_INCOHERENCE) if isinstance(info, Mapping) else None
    if spec is None:
        return None
    if not isinstance(spec, Mapping) or set(spec) != {"kind", "seed"}:
        raise ValueError(f"the incoherence record {spec!r} is not {{'kind': 'hadamard', 'seed': N}}")
    return Incoherence((int(shape[0]), int(shape[1])), spec["seed"], spec["kind"])


@dataclass(frozen=True)
class PackedLayout:
    """What loaders, runtimes and exporters need to know of a stored weight, in the methods' (out x in) orientation:
    W = Q + L R, each term optional. `backbone` is a full-size matrix Q (rtn, gptq, qlr), `left`/`right` the low-rank
    factors L (out x r) and R (r x in) (lplr, lsvd, dsvd, qlr's correction; None for qlr at rank 0).

    `transform`: an incoherence transform (`math.hadamard.Incoherence`, gptq/qlr `--incoherence hadamard`): the
    stored matrices make W' = Q + L R in a rotated basis and the weight is W = U^T W' V, so y = U^T (W' (V x)). A
    consumer that reads the stored matrices applies it (the packed runtime) or refuses the weight (exports)."""

    backbone: QuantPart | None = None
    left: QuantPart | None = None
    right: QuantPart | None = None
    transform: Incoherence | None = None

    def __post_init__(self) -> None:
        if (self.left is None) != (self.right is None):
            raise ValueError("a low-rank layout needs both factors")
        if self.backbone is None and self.left is None:
            raise ValueError("a layout stores a backbone, factors, or both")
        if self.transform is not None and tuple(self.transform.shape) != tuple(self.shape):
            raise ValueError(f"the incoherence transform is for {list(self.transform.shape)}, the weight is "
                             f"{list(self.shape)}")

    @property
    def low_rank(self) -> bool:
        return self.left is not None

    @property
    def rank(self) -> int:
        return self.left.spec.shape[1] if self.left is not None else 0

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of the weight."""
        if self.backbone is not None:
            return tuple(self.backbone.spec.shape)
        return self.left.spec.shape[0], self.right.spec.shape[1]


@dataclass
class InputStats:
    """What is known of a weight's inputs: H = E[x x^T] (in x in, on the compute device) from calibration, its
    statistic key (weights with the same key, e.g. q/k/v, see the same inputs), and a cache of what is derived from H
    (such as its whitening), shared by those weights."""

    H: torch.Tensor
    key: str = ""
    cache: dict = field(default_factory=dict)

    def whitening(self):
        """The whitening S S^T = H (+ shift) of H (`math.whiten.whitening`), computed once per statistic."""
        if "whitening" not in self.cache:
            from ..math.whiten import whitening

            self.cache["whitening"] = whitening(self.H)
        return self.cache["whitening"]

    def gptq_factor(self, damp: float, act_order: bool, work: torch.dtype):
        """GPTQ's factorization of H (`math.gptq.gptq_factor`), computed once per statistic and GPTQ setting: q/k/v,
        and a qlr's backbone updates and right factors, are all quantized against this H."""
        key = ("gptq_factor", damp, act_order, work)
        if key not in self.cache:
            from ..math.gptq import gptq_factor

            self.cache[key] = gptq_factor(self.H, damp=damp, act_order=act_order, work=work)
        return self.cache[key]

    def digest(self) -> str:
        """A hash of H's bytes (computed once), identifying the statistic's content."""
        if "digest" not in self.cache:
            from ..math.fingerprint import tensor_digest

            self.cache["digest"] = tensor_digest(self.H)
        return self.cache["digest"]


class Method:
    """A compression method. Subclasses set `settings_cls` and `parts` and implement `compress`, `decode` and
    `predict`; `register(name)` makes them available under `name`.

    parts: the stored part names this method writes (a stored tensor is "<weight>.<part>" or "<weight>.<part>.<field>";
    "" is the weight's own name); factored: stores a left and a right factor that `decode_factors` returns;
    uses_stats: becomes activation-aware when `compress` gets calibration statistics; record_fields: the names of the
    method-specific facts `compress` returns in `MethodResult.extra` (the tensor record's `extra`; one report column
    each).
    """

    name: str = ""
    settings_cls: type[Settings] = Settings
    parts: tuple[str, ...] = ()
    record_fields: tuple[str, ...] = ()
    factored: bool = False
    uses_stats: bool = False  # what it stores depends on calibration statistics when they are given
    has_base: bool = False  # a factored method whose weight is a full-size backbone plus L R (`decode_base`)

    def summary(self) -> str:
        """One line describing the method (`convert --help`): the start of its module's docstring (60 characters)."""
        import sys

        doc = " ".join((sys.modules[type(self).__module__].__doc__ or self.name).split("\n\n")[0].split())
        if len(doc) <= 60:
            return doc
        return doc[:60].rsplit(" ", 1)[0].rstrip(",;:.") + "..."

    @property
    def uses_rank(self) -> bool:
        return any(f.name == RANK_FIELD for f in knob_fields(self.settings_cls))

    def compress(self, W: torch.Tensor, settings: Settings, seed: int,
                 stats: InputStats | None = None) -> MethodResult:
        """Compress a 2-D (out x in) float tensor that already sits on the compute device. `stats` (from
        calibration) describes its inputs; a method that does not use them ignores them, and without them every
        method works on the weight alone (as if H = I)."""
        raise NotImplementedError

    def decode(self, parts: dict[str, torch.Tensor], info: dict) -> torch.Tensor:
        """Rebuild the dense matrix (out x in) from the stored parts: float32, except `copy`, which returns the stored
        tensor verbatim (any dtype, e.g. int64 position ids)."""
        raise NotImplementedError

    def decode_factors(self, parts: dict[str, torch.Tensor], info: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The dequantized float32 factors (L, R) of a factored method."""
        raise NotImplementedError(f"method {self.name} is not factored")

    def decode_base(self, parts: dict[str, torch.Tensor], info: dict) -> torch.Tensor | None:
        """A factored method's full-size backbone Q (W = Q + L R), float32, or None when it has none."""
        return None

    def layout(self, info: dict) -> PackedLayout | None:
        """How a stored weight with this `info` is made of quantized matrices (W = Q + L R, see `PackedLayout`), for
        the loaders' runtime modules and the exporters; None when it is stored as one dense tensor (laser, copy) or
        in a form they do not handle (fused experts). The one place a method says what its parts mean."""
        return None

    def candidates(self, W: torch.Tensor, settings: Settings, stats: InputStats | None, target: float,
                   fixed: frozenset[str], seed: int = 0) -> list[Candidate] | None:
        """The choices a global bit budget may make for this weight: (knob changes, stored bits, estimated relative
        squared output error tr(D H D^T) / tr(W H W^T), H = I without calibration), around `target` bits/param and
        never changing a knob in `fixed` (given explicitly). None: the method has no such choices (its size is
        fixed by its settings). `seed`: the tensor's seed, as `compress` will get it."""
        return None

    def predict(self, shape: tuple[int, int], dtype: torch.dtype, settings: Settings,
                calibrated: bool = False) -> tuple[int | None, dict]:
        """(rank or None, {suffix: (dtype name, shape)}) of what `compress` would store (with calibration statistics
        when `calibrated`), computing nothing; an empty dict when the stored size depends on the data."""
        raise NotImplementedError


def _same_knob(a: dataclasses.Field, b: dataclasses.Field) -> bool:
    """Two declarations of one knob are alike: same type, choices, optionality and help (defaults may differ)."""
    return all(a.metadata.get(k) == b.metadata.get(k) for k in ("type", "choices", "optional", "help"))


def register(name: str):
    """Class decorator: instantiate and register a method under `name`. A knob that two methods both declare must be
    declared alike (same type, choices and help; each may have its own default), since the command line offers it
    once."""

    def wrap(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is registered twice")
        known = all_knobs()
        for f in knob_fields(cls.settings_cls):
            if f.name in known and not _same_knob(known[f.name], f):
                raise ValueError(f"method {name!r} declares knob {f.name!r} unlike an earlier method does")
        cls.name = name
        _REGISTRY[name] = cls()
        return cls

    return wrap


def unregister(name: str) -> None:
    """Remove a registered method (e.g. one a test or plugin registered for a while)."""
    _REGISTRY.pop(name, None)


def get_method(name: str) -> Method:
    """The registered method called `name`; an unknown name lists the registered ones."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise LplrError(f"method {name!r} is unknown; registered methods: {', '.join(available_methods())}") from None


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def all_knobs() -> dict[str, dataclasses.Field]:
    """Every knob some registered method declares, by name (first declaration), in registration order."""
    out: dict[str, dataclasses.Field] = {}
    for method in _REGISTRY.values():
        for f in knob_fields(method.settings_cls):
            out.setdefault(f.name, f)
    return out


def knob_defaults(name: str) -> dict[str, Any]:
    """Method -> its default of knob `name`, for every registered method that declares it."""
    out = {}
    for method_name, method in sorted(_REGISTRY.items()):
        for f in knob_fields(method.settings_cls):
            if f.name == name:
                out[method_name] = f.default_factory() if f.default is dataclasses.MISSING else f.default
    return out


def flat_defaults() -> dict[str, Any]:
    """The empty flat layer: method lplr, every knob at its method's default."""
    return {"method": "lplr"}


def _at(where: str, message: str) -> LplrError:
    return LplrError(f"{where}: {message}" if where else message)


def _check_keys(changes: Mapping[str, Any], where: str) -> None:
    allowed = {"method", *all_knobs(), *RANK_POLICIES}
    unknown = sorted(k for k in changes if k not in allowed)
    if unknown:
        raise _at(where, f"unknown setting(s) {', '.join(map(str, unknown))}; allowed: {', '.join(sorted(allowed))}")


def overlay(layer: Mapping[str, Any], changes: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """`layer` with `changes` applied, both in the flat vocabulary: the values given explicitly (a knob a layer does
    not hold takes each method's own default). A rank policy kind in `changes` (at most one) replaces the layer's
    policy; a knob declared `reset_with=K` returns to its default when K changes and it does not. The result holds
    the policy as a RankPolicy under `rank`."""
    _check_keys(changes, where)
    kinds = [k for k in RANK_POLICIES if k in changes and not isinstance(changes[k], RankPolicy)]
    if len(kinds) > 1:
        raise _at(where, f"give one rank policy, not {' and '.join(opt(k) for k in kinds)}")
    out = dict(layer)
    for name, f in all_knobs().items():
        if f.metadata.get("reset_with") in changes and name not in changes:
            out.pop(name, None)
    out.update({k: v for k, v in changes.items() if k not in RANK_POLICIES})
    if kinds:
        try:
            out[RANK_FIELD] = RankPolicy(kinds[0], changes[kinds[0]])
        except LplrError as e:
            raise _at(where, e.template) from None
    elif isinstance(changes.get(RANK_FIELD), RankPolicy):
        out[RANK_FIELD] = changes[RANK_FIELD]
    return out


def settings_from_flat(layer: Mapping[str, Any], where: str = "") -> Settings:
    """The settings of `layer["method"]` from a flat layer (see `overlay`); knobs the method does not declare are
    ignored, since a layer carries knobs for every method."""
    try:
        method = get_method(layer.get("method", "lplr"))
    except LplrError as e:
        raise _at(where, e.template) from None
    names = {f.name for f in knob_fields(method.settings_cls)}
    try:
        return method.settings_cls(method=method.name, **{k: v for k, v in layer.items() if k in names})
    except LplrError as e:
        raise _at(where, e.template) from None


def layer_json(layer: Mapping[str, Any]) -> dict[str, Any]:
    """A flat layer as JSON (the rank policy as {"kind", "value"})."""
    return {k: v.to_json() if isinstance(v, RankPolicy) else v for k, v in layer.items()}


def make_settings(method: str = "lplr", **values: Any) -> Settings:
    """The settings of `method` from keyword knobs in the flat vocabulary (`rank=` may be a RankPolicy or a fixed
    rank). Knobs of other methods are ignored, as in any flat layer; a name no method declares is an error."""
    get_method(method)
    return settings_from_flat(overlay(flat_defaults(), {"method": method, **values}))
