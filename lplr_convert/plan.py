"""Which tensor gets which method: block/matrix-type naming for any architecture, selections, recipes, LASER vocab."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .errors import LplrError
from .methods import MethodSettings, RankPolicy
from .methods.settings import RANK_POLICIES

__all__ = [
    "CONV1D_MODEL_TYPES",
    "MATRIX_TYPES",
    "TYPE_GROUPS",
    "PlanOptions",
    "TensorPlan",
    "block_index",
    "load_recipe",
    "make_plan",
    "matrix_type",
    "parse_layers",
    "parse_types",
]

MATRIX_TYPES = ("q_proj", "k_proj", "v_proj", "qkv", "out_proj", "fc_in", "fc_up", "fc_out", "router", "other")
# LASER's lname vocabulary -> matrix types ("dont" selects nothing).
TYPE_GROUPS = {"q_proj": {"q_proj", "qkv"}, "k_proj": {"k_proj", "qkv"}, "v_proj": {"v_proj", "qkv"},
               "out_proj": {"out_proj"}, "fc_in": {"fc_in"}, "fc_up": {"fc_up"}, "fc_out": {"fc_out"},
               "mlp": {"fc_in", "fc_up", "fc_out"}, "attn": {"q_proj", "k_proj", "v_proj", "qkv", "out_proj"},
               "qkv": {"qkv"}, "router": {"router"}, "other": {"other"}, "dont": set()}
# Families whose block weights are transformers' Conv1D (stored in x out).
CONV1D_MODEL_TYPES = {"gpt2", "openai-gpt", "imagegpt", "decision_transformer"}

_BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
_LEAVE_ALONE = re.compile(r"(embed|wte|wpe|norm|(^|\.)ln_|layernorm|lm_head|relative_attention_bias|position|pooler"
                          r"|(^|\.)shared\.)", re.IGNORECASE)
_ATTN_WORDS = ("attn", "attention")
_LEAF_TYPES = {
    "q_proj": "q_proj", "query": "q_proj", "q": "q_proj", "wq": "q_proj", "q_lin": "q_proj",
    "k_proj": "k_proj", "key": "k_proj", "k": "k_proj", "wk": "k_proj", "k_lin": "k_proj",
    "v_proj": "v_proj", "value": "v_proj", "v": "v_proj", "wv": "v_proj", "v_lin": "v_proj",
    "query_key_value": "qkv", "c_attn": "qkv", "qkv_proj": "qkv", "wqkv": "qkv", "qkv": "qkv", "in_proj": "qkv",
    "o_proj": "out_proj", "out_proj": "out_proj", "out_lin": "out_proj", "o": "out_proj",
    "gate": "router", "router": "router", "shared_expert_gate": "router",
    "gate_proj": "fc_in", "w1": "fc_in", "fc_in": "fc_in", "fc1": "fc_in", "c_fc": "fc_in", "dense_h_to_4h": "fc_in",
    "wi": "fc_in", "wi_0": "fc_in", "lin1": "fc_in", "gate_up_proj": "fc_in",
    "up_proj": "fc_up", "w3": "fc_up", "wi_1": "fc_up",
    "down_proj": "fc_out", "w2": "fc_out", "fc_out": "fc_out", "fc2": "fc_out", "dense_4h_to_h": "fc_out",
    "lin2": "fc_out",
}


def block_index(name: str) -> int | None:
    """Transformer block index of a tensor name (first numbered block in the path), or None."""
    m = _BLOCK.search(name)
    return int(m.group(1)) if m else None


def matrix_type(name: str) -> str | None:
    """Matrix type of a 2-D weight inside a block (q_proj, ..., fc_out, 'other'), or None outside blocks.

    Matches the path below the block prefix, so e.g. BERT's `attention.output.dense` (out_proj) and the block's own
    `output.dense` (fc_out) are told apart.
    """
    m = _BLOCK.search(name)
    if not m:
        return None
    rel = name[m.end():].removesuffix(".weight")
    parts = rel.split(".")
    leaf, parents = parts[-1], [p.lower() for p in parts[:-1]]
    in_attn = any(w in p for p in parents for w in _ATTN_WORDS)
    if leaf.lower() in _LEAF_TYPES:
        return _LEAF_TYPES[leaf.lower()]
    if leaf in ("dense", "c_proj", "wo", "proj"):
        if in_attn:
            return "out_proj"
        if parents and parents[-1] == "intermediate":
            return "fc_in"
        return "fc_out"
    return "other"


def _items(spec: str | list) -> list:
    """A comma-separated option value or a list from a recipe, as a list."""
    return spec if isinstance(spec, list) else [s for s in str(spec).replace(" ", "").split(",") if s]


def parse_layers(spec: str | list | None) -> list[int] | None:
    """'0,3,5-7' or [0, 3] -> sorted list; -1 (or 'all') means every block (None)."""
    if spec is None:
        return None
    out: set[int] = set()
    for item in _items(spec):
        s = str(item)
        if s in ("-1", "all"):
            return None
        try:
            if "-" in s[1:]:
                a, b = s.split("-", 1)
                out.update(range(int(a), int(b) + 1))
            else:
                out.add(int(s))
        except ValueError:
            raise LplrError(f"--layers {spec!r} is not a list of block indices; use e.g. '0,3,5-7' or -1 for all")
    return sorted(out)


def parse_types(spec: str | list | None) -> set[str] | None:
    """LASER lnames ('fc_in,attn', ['mlp']) -> set of matrix types."""
    if spec is None:
        return None
    out: set[str] = set()
    for t in _items(spec):
        if t not in TYPE_GROUPS:
            raise LplrError(f"--types {t!r} is unknown; use any of {', '.join(TYPE_GROUPS)}")
        out |= TYPE_GROUPS[t]
    return out


@dataclass(frozen=True)
class Rule:
    """One recipe rule: tensors matching `pattern` (regex) and/or `layers`/`types` get `settings`."""

    settings: MethodSettings
    pattern: str | None = None
    layers: tuple[int, ...] | None = None
    types: frozenset[str] | None = None

    def matches(self, name: str, layer: int | None, mtype: str | None) -> bool:
        if self.pattern is not None and not re.search(self.pattern, name):
            return False
        if self.layers is not None and layer not in self.layers:
            return False
        return self.types is None or mtype in self.types


@dataclass(frozen=True)
class PlanOptions:
    settings: MethodSettings = field(default_factory=MethodSettings)
    include: str | None = None
    exclude: str | None = None
    layers: tuple[int, ...] | None = None
    types: frozenset[str] | None = None
    rules: tuple[Rule, ...] = ()


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    settings: MethodSettings  # method "copy" for tensors left alone
    transposed: bool
    layer: int | None
    matrix_type: str | None
    reason: str

    @property
    def method(self) -> str:
        return self.settings.method


_SETTING_KEYS = {"method", "b1", "b2", "b0", "quantizer", "group_size", "sketch", "power_iters", "svd"}


def settings_from_dict(d: dict, base: MethodSettings, where: str) -> MethodSettings:
    """Overlay recipe keys (method, b1, rank_fraction, rho, ...) on `base`."""
    unknown = set(d) - _SETTING_KEYS - set(RANK_POLICIES) - {"pattern", "layers", "types", "match"}
    if unknown:
        raise LplrError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; allowed: "
                        f"{', '.join(sorted(_SETTING_KEYS | set(RANK_POLICIES)))}, pattern, layers, types")
    changes = {k: d[k] for k in _SETTING_KEYS if k in d}
    policies = [k for k in RANK_POLICIES if k in d]
    if len(policies) > 1:
        raise LplrError(f"{where}: give one rank policy, not {' and '.join(policies)}")
    if policies:
        changes["rank"] = RankPolicy(policies[0], d[policies[0]])
    if changes.get("quantizer", base.quantizer) != "group" and "quantizer" in changes:
        changes.setdefault("group_size", None)
    try:
        return replace(base, **changes)
    except TypeError as e:
        raise LplrError(f"{where}: {e}") from None


def load_recipe(path: str | Path, base: MethodSettings) -> tuple[MethodSettings, tuple[Rule, ...]]:
    """Read a YAML or JSON recipe: {defaults: {...}, rules: [{pattern|layers|types, method, settings...}]}.

    The first matching rule decides a tensor's method; selected tensors no rule matches get the defaults.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise LplrError(f"--recipe {path}: cannot read it ({e.strerror or e})") from None
    try:
        if path.suffix.lower() == ".json":
            doc = json.loads(text)
        else:
            import yaml

            doc = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001  (yaml and json parse errors)
        raise LplrError(f"--recipe {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'} "
                        f"({str(e).splitlines()[0]})") from None
    if isinstance(doc, list):
        doc = {"rules": doc}
    if not isinstance(doc, dict) or not isinstance(doc.get("rules", []), list):
        raise LplrError(f"--recipe {path} must be a mapping with 'defaults' and a list of 'rules'")
    defaults = settings_from_dict(doc.get("defaults") or {}, base, f"--recipe {path} defaults")
    rules = []
    for i, raw in enumerate(doc.get("rules") or []):
        where = f"--recipe {path} rule {i + 1}"
        if not isinstance(raw, dict):
            raise LplrError(f"{where} must be a mapping")
        raw = {**raw, **(raw.get("match") or {})}
        raw.pop("match", None)
        if not any(k in raw for k in ("pattern", "layers", "types")):
            raise LplrError(f"{where} selects nothing; give a pattern, layers or types")
        if raw.get("pattern") is not None:
            try:
                re.compile(raw["pattern"])
            except re.error as e:
                raise LplrError(f"{where}: pattern {raw['pattern']!r} is not a valid regex ({e})") from None
        layers = parse_layers(raw.get("layers"))
        types = parse_types(raw.get("types"))
        rules.append(Rule(settings_from_dict(raw, defaults, where), raw.get("pattern"),
                          tuple(layers) if layers is not None else None,
                          frozenset(types) if types is not None else None))
    return defaults, tuple(rules)


def _compressible(shape: tuple[int, ...], dtype: torch.dtype) -> bool:
    return len(shape) == 2 and dtype.is_floating_point and min(shape) > 0


def make_plan(headers, config: dict, options: PlanOptions) -> list[TensorPlan]:
    """A plan for every tensor (in the order given). Tensors not selected are planned as 'copy'."""
    model_type = (config or {}).get("model_type", "")
    conv1d = model_type in CONV1D_MODEL_TYPES
    for label, rx in (("--include", options.include), ("--exclude", options.exclude)):
        if rx is not None:
            try:
                re.compile(rx)
            except re.error as e:
                raise LplrError(f"{label} {rx!r} is not a valid regular expression ({e})") from None
    copy = replace(options.settings, method="copy")
    plans = []
    for h in headers:
        name, shape, dtype = h.name, tuple(h.shape), h.dtype
        layer, mtype = block_index(name), None
        if len(shape) == 2:
            mtype = matrix_type(name)
        ok = _compressible(shape, dtype)
        default_pick = ok and name.endswith(".weight") and layer is not None and not _LEAVE_ALONE.search(name) \
            and mtype != "router"  # MoE routers: tiny and sensitive, left alone unless asked for
        pick = default_pick
        reason = "block linear weight" if pick else ("not a 2-D float tensor" if not ok else "left alone")
        if options.include is not None:
            pick = ok and re.search(options.include, name) is not None
            reason = "--include" if pick else reason
        if pick and options.exclude is not None and re.search(options.exclude, name):
            pick, reason = False, "--exclude"
        if pick and options.layers is not None and layer not in options.layers:
            pick, reason = False, "--layers"
        if pick and options.types is not None and mtype not in options.types:
            pick, reason = False, "--types"
        settings = options.settings if pick else copy
        if ok:
            for i, rule in enumerate(options.rules):
                if rule.matches(name, layer, mtype):
                    settings, reason = rule.settings, f"recipe rule {i + 1}"
                    break
        transposed = conv1d and settings.method != "copy" and layer is not None and len(shape) == 2
        plans.append(TensorPlan(name, shape, dtype, settings, transposed, layer, mtype, reason))
    return plans
