"""Which tensor gets which method: block/matrix-type naming for any architecture, selections, recipes, LASER vocab."""

from __future__ import annotations

import bisect
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import LplrError, opt
from ..methods import Settings, flat_defaults, get_method, make_settings, settings_from_flat
from ..methods.base import overlay
from .experts import experts_in_major, is_stacked_experts

__all__ = [
    "CONV1D_MODEL_TYPES",
    "MATRIX_TYPES",
    "TYPE_GROUPS",
    "Layers",
    "PlanOptions",
    "TensorPlan",
    "block_index",
    "build_plan_options",
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

# ALBERT's `albert_layer_groups.N` is a block its forward runs several times (one weight shared by every layer).
_BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block|albert_layer_groups)\.(\d+)\.")
_LEAVE_ALONE = re.compile(r"(embed|wte|wpe|norm|(^|\.)ln_|layernorm|lm_head|relative_attention_bias|position|pooler"
                          r"|(^|\.)shared\.)", re.IGNORECASE)
_ATTN_WORDS = ("attn", "attention")
_LEAF_TYPES = {
    "q_proj": "q_proj", "query": "q_proj", "q": "q_proj", "wq": "q_proj", "q_lin": "q_proj", "query_proj": "q_proj",
    "k_proj": "k_proj", "key": "k_proj", "k": "k_proj", "wk": "k_proj", "k_lin": "k_proj", "key_proj": "k_proj",
    "v_proj": "v_proj", "value": "v_proj", "v": "v_proj", "wv": "v_proj", "v_lin": "v_proj", "value_proj": "v_proj",
    "query_key_value": "qkv", "c_attn": "qkv", "qkv_proj": "qkv", "wqkv": "qkv", "qkv": "qkv", "in_proj": "qkv",
    "o_proj": "out_proj", "out_proj": "out_proj", "out_lin": "out_proj", "o": "out_proj",
    "gate": "router", "router": "router", "shared_expert_gate": "router",
    "gate_proj": "fc_in", "w1": "fc_in", "fc_in": "fc_in", "fc1": "fc_in", "c_fc": "fc_in", "dense_h_to_4h": "fc_in",
    "wi": "fc_in", "wi_0": "fc_in", "lin1": "fc_in", "gate_up_proj": "fc_in",
    "up_proj": "fc_up", "w3": "fc_up", "wi_1": "fc_up",
    "down_proj": "fc_out", "w2": "fc_out", "fc_out": "fc_out", "fc2": "fc_out", "dense_4h_to_h": "fc_out",
    "lin2": "fc_out", "ffn_output": "fc_out", "ffn": "fc_in",
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
    if "router" in parents:  # e.g. GraniteMoE's router.layer.weight
        return "router"
    in_attn = any(w in p for p in parents for w in _ATTN_WORDS)
    if leaf.lower() in _LEAF_TYPES:
        return _LEAF_TYPES[leaf.lower()]
    if leaf in ("input_linear", "output_linear"):  # JetMoE/GraniteMoE stacked experts (attention or MLP)
        return ("qkv" if leaf == "input_linear" else "out_proj") if in_attn else \
            ("fc_in" if leaf == "input_linear" else "fc_out")
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


@dataclass(frozen=True)
class Layers:
    """Block indices as sorted, disjoint, inclusive ranges: '0-100000000' is one pair, not 1e8 integers."""

    ranges: tuple[tuple[int, int], ...]
    text: str = field(default="", compare=False)  # as given, for messages

    def __contains__(self, layer: object) -> bool:
        if not isinstance(layer, int):
            return False
        i = bisect.bisect_right(self.ranges, (layer, float("inf"))) - 1
        return i >= 0 and self.ranges[i][0] <= layer <= self.ranges[i][1]

    def beyond(self, n_blocks: int) -> bool:
        """Whether any index is >= n_blocks (outside a checkpoint of blocks 0..n_blocks-1)."""
        return bool(self.ranges) and self.ranges[-1][1] >= n_blocks


_LAYER_ITEM = re.compile(r"([0-9]{1,15})(?:-([0-9]{1,15}))?")  # bounded: int() of 5000 digits raises
_LAYER_FIX = "use e.g. '0,3,5-7' (block indices from 0, ranges low-high) or -1 for all"


def parse_layers(spec: str | list | None) -> Layers | None:
    """'0,3,5-7' or [0, 3] -> Layers; -1 (or 'all') means every block (None). A negative index other than -1, or a
    range whose low end exceeds its high end, is refused: it would select nothing."""
    if spec is None:
        return None
    ranges = []
    for item in _items(spec):
        s = str(item).strip()
        if s in ("-1", "all"):
            return None
        m = None if isinstance(item, bool) else _LAYER_ITEM.fullmatch(s)
        if m is None:
            if re.fullmatch(r"-[0-9]{1,15}", s):
                raise LplrError(f"{opt('layers')} {spec!r}: block {s} does not exist (blocks count from 0); "
                                f"{_LAYER_FIX}")
            raise LplrError(f"{opt('layers')} {spec!r} is not a list of block indices; {_LAYER_FIX}")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if lo > hi:
            raise LplrError(f"{opt('layers')} {spec!r}: range {lo}-{hi} is empty (its low end is above its high "
                            f"end); write it as {hi}-{lo}")
        ranges.append((lo, hi))
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return Layers(tuple(merged), str(spec))


def parse_types(spec: str | list | None) -> set[str] | None:
    """LASER lnames ('fc_in,attn', ['mlp']) -> set of matrix types."""
    if spec is None:
        return None
    out: set[str] = set()
    for t in _items(spec):
        if not isinstance(t, str) or t not in TYPE_GROUPS:
            raise LplrError(f"{opt('types')} {t!r} is unknown; use any of {', '.join(TYPE_GROUPS)}")
        out |= TYPE_GROUPS[t]
    return out


@dataclass(frozen=True)
class Rule:
    """One recipe rule: tensors matching `pattern` (regex) and/or `layers`/`types` get `settings`."""

    settings: Settings
    pattern: str | None = None
    layers: Layers | None = None
    types: frozenset[str] | None = None

    def matches(self, name: str, layer: int | None, mtype: str | None) -> bool:
        if self.pattern is not None and not re.search(self.pattern, name):
            return False
        if self.layers is not None and layer not in self.layers:
            return False
        return self.types is None or mtype in self.types


@dataclass(frozen=True)
class PlanOptions:
    """What to compress and how. `defaults` is the flat settings layer (see `methods.base.overlay`): the method
    and knobs of every selected tensor that no rule matches, and the base that recipe rules change."""

    defaults: dict = field(default_factory=flat_defaults)
    include: str | None = None
    exclude: str | None = None
    layers: Layers | None = None
    types: frozenset[str] | None = None
    rules: tuple[Rule, ...] = ()

    @property
    def settings(self) -> Settings:
        """The settings of the default method."""
        return settings_from_flat(self.defaults)


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    settings: Settings  # method "copy" for tensors left alone
    transposed: bool
    layer: int | None
    matrix_type: str | None
    reason: str

    @property
    def method(self) -> str:
        return self.settings.method

    @property
    def experts(self) -> int | None:
        """The number of experts of a fused 3-D experts tensor (compressed expert by expert), else None."""
        return self.shape[0] if len(self.shape) == 3 else None

    @property
    def oriented_shape(self) -> tuple[int, ...]:
        """The shape the method sees: (out, in), i.e. a Conv1D weight transposed; one expert's for fused experts."""
        shape = self.shape[1:] if self.experts else self.shape
        return (shape[1], shape[0]) if self.transposed else shape


_MATCH_KEYS = ("pattern", "layers", "types")


def _unique_keys(pairs: list) -> dict:
    """A JSON object whose keys are unique (a repeated key would silently override the first)."""
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"the key {key!r} appears twice; keep one")
        seen[key] = value
    return seen


def _load_yaml_unique(text: str):
    """yaml.safe_load, refusing a mapping that repeats a key (YAML keeps the last one silently)."""
    import yaml

    class _Unique(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        keys = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in keys:
                raise ValueError(f"the key {key!r} appears twice (line {key_node.start_mark.line + 1}); keep one")
            keys.add(key)
        return loader.construct_mapping(node, deep)

    _Unique.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return yaml.load(text, Loader=_Unique)  # noqa: S506  (a SafeLoader subclass)


def _read_recipe(path: Path):
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LplrError(f"{opt('recipe')} {path} is not UTF-8 text; pass a YAML or JSON recipe file") from None
    except OSError as e:
        raise LplrError(f"{opt('recipe')} {path}: cannot read it ({e.strerror or e})") from None
    try:
        if path.suffix.lower() == ".json":
            return json.loads(text, object_pairs_hook=_unique_keys)
        return _load_yaml_unique(text)
    except Exception as e:  # noqa: BLE001  (yaml and json parse errors, a duplicate key)
        raise LplrError(f"{opt('recipe')} {path} is not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'} "
                        f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def _rule(raw, defaults: dict, where: str) -> Rule:
    if not isinstance(raw, dict):
        raise LplrError(f"{where} must be a mapping of settings and pattern/layers/types")
    match = raw.get("match") or {}
    if not isinstance(match, dict):
        raise LplrError(f"{where}: match must be a mapping of pattern/layers/types")
    raw = {**{k: v for k, v in raw.items() if k != "match"}, **match}
    if not any(k in raw for k in _MATCH_KEYS):
        raise LplrError(f"{where} selects nothing; give a pattern, layers or types")
    pattern = raw.get("pattern")
    if pattern is not None:
        if not isinstance(pattern, str):
            raise LplrError(f"{where}: pattern must be a regular expression in quotes, got {pattern!r}")
        try:
            re.compile(pattern)
        except re.error as e:
            raise LplrError(f"{where}: pattern {pattern!r} is not a valid regex ({e})") from None
    try:
        layers = parse_layers(raw.get("layers"))
        types = parse_types(raw.get("types"))
    except LplrError as e:
        raise LplrError(f"{where}: {e.template}") from None
    layer = overlay(defaults, {k: v for k, v in raw.items() if k not in _MATCH_KEYS}, where)
    return Rule(settings_from_flat(layer, where), pattern, layers, frozenset(types) if types is not None else None)


def load_recipe(path: str | Path, defaults: dict) -> tuple[dict, tuple[Rule, ...]]:
    """Read a YAML or JSON recipe: {defaults: {...}, rules: [{pattern|layers|types, method, settings...}]}.

    Returns the flat defaults layer (`defaults` changed by the recipe's own) and the rules. The first matching rule
    decides a tensor's method; selected tensors no rule matches get the defaults.
    """
    path = Path(path)
    doc = _read_recipe(path)
    if isinstance(doc, list):
        doc = {"rules": doc}
    where = f"{opt('recipe')} {path}"
    if not isinstance(doc, dict) or not isinstance(doc.get("rules") or [], list):
        raise LplrError(f"{where} must be a mapping with 'defaults' (a mapping) and 'rules' (a list)")
    unknown = sorted(map(str, set(doc) - {"defaults", "rules"}))
    if unknown:
        raise LplrError(f"{where}: unknown top-level key(s) {', '.join(unknown)}; use defaults and rules")
    if not isinstance(doc.get("defaults") or {}, dict):
        raise LplrError(f"{where}: defaults must be a mapping of settings, got {doc['defaults']!r}")
    layer = overlay(defaults, doc.get("defaults") or {}, f"{where} defaults")
    settings_from_flat(layer, f"{where} defaults")
    rules = tuple(_rule(raw, layer, f"{where} rule {i + 1}") for i, raw in enumerate(doc.get("rules") or []))
    return layer, rules


def build_plan_options(layer: dict, recipe: str | None = None, include: str | None = None,
                       exclude: str | None = None, layers: str | list | None = None,
                       types: str | list | None = None) -> tuple[PlanOptions, str | None]:
    """Plan options from a flat settings layer, an optional recipe file and the selections; also returns the
    recipe's text (recorded in the manifest)."""
    rules, recipe_text = (), None
    if recipe:
        layer, rules = load_recipe(recipe, layer)
        recipe_text = Path(recipe).read_text(encoding="utf-8")
    picked_layers, picked_types = parse_layers(layers), parse_types(types)
    return PlanOptions(layer, include, exclude, picked_layers,
                       frozenset(picked_types) if picked_types is not None else None, rules), recipe_text


def _compressible(shape: tuple[int, ...], dtype: torch.dtype) -> bool:
    """A non-empty 2-D float matrix of at least 16 bits. float8 weights are copied: an fp8 checkpoint keeps each
    weight's scales in separate tensors (e.g. weight_scale_inv), so the 8-bit values alone are not the weight."""
    return len(shape) == 2 and dtype.is_floating_point and dtype.itemsize >= 2 and min(shape) > 0


def _not_compressible(shape: tuple[int, ...], dtype: torch.dtype) -> str:
    if len(shape) == 2 and dtype.is_floating_point and dtype.itemsize == 1:
        return "float8 weight, copied verbatim (its scales live in other tensors)"
    return "not a 2-D float tensor"


def stored_prefixes(plan: TensorPlan) -> list[tuple[str, bool]]:
    """(prefix, whether fields may follow it) of the names a compressed tensor is stored under: "<name>.<part>"
    (or "<name>.<part>.<field>") for each part the method declares, "<name>.<expert>.<part>..." for fused experts;
    a part "" is stored under the head itself ("<name>" or "<name>.<expert>")."""
    heads = [f"{plan.name}.{e}" for e in range(plan.experts)] if plan.experts else [plan.name]
    return [(f"{h}.{part}", True) if part else (h, False) for h in heads for part in get_method(plan.method).parts]


def _taken(sorted_names: list[str], prefix: str, fields: bool) -> str | None:
    """A name in `sorted_names` equal to `prefix`, or (with `fields`) extending "<prefix>."."""
    i = bisect.bisect_left(sorted_names, prefix)
    if i < len(sorted_names) and sorted_names[i] == prefix:
        return prefix
    i = bisect.bisect_left(sorted_names, prefix + ".")
    return sorted_names[i] if fields and i < len(sorted_names) and sorted_names[i].startswith(prefix + ".") else None


def check_collisions(plans: list[TensorPlan]) -> None:
    """Refuse a plan in which a source tensor is named like a stored part of another (e.g. `X.weight` compressed
    and `X.weight.lplr_left.scale`), naming both: the two would share a stored name."""
    names = sorted(p.name for p in plans)
    for p in plans:
        if p.method == "copy":
            continue
        for prefix, fields in stored_prefixes(p):
            hit = None if prefix == p.name else _taken(names, prefix, fields)
            if hit is not None:
                raise LplrError(f"tensors {p.name} and {hit} would share a stored name: {hit} is named "
                                f"like a stored part of {p.name} ({p.method}); rename it in the checkpoint, or leave "
                                f"{p.name} uncompressed with {opt('exclude')}")


def _check_layers(options: PlanOptions, blocks: set[int]) -> None:
    """--layers must name blocks this checkpoint has (blocks 0..n-1), and each recipe rule's layers at least one: a
    selection beyond the model would silently compress nothing."""
    n = max(blocks) + 1 if blocks else 0
    have = f"this checkpoint's blocks are 0-{n - 1}" if n else "this checkpoint has no numbered blocks"
    if options.layers is not None and options.layers.beyond(n):
        raise LplrError(f"{opt('layers')} {options.layers.text} names blocks beyond the model ({have}); pass indices in "
                        f"that range, or -1 for all")
    for i, rule in enumerate(options.rules):
        if rule.layers is not None and not any(a < n for a, _ in rule.layers.ranges):
            raise LplrError(f"{opt('recipe')} rule {i + 1}: its layers select no block ({have}); fix its layers")


def make_plan(headers, config: dict, options: PlanOptions) -> list[TensorPlan]:
    """A plan for every tensor (in the order given). Tensors not selected are planned as 'copy'. A fused 3-D experts
    tensor is planned as one tensor whose experts are compressed one by one (see `experts`)."""
    model_type = (config or {}).get("model_type", "")
    conv1d = model_type in CONV1D_MODEL_TYPES
    for label, rx in (("include", options.include), ("exclude", options.exclude)):
        if rx is not None:
            try:
                re.compile(rx)
            except re.error as e:
                raise LplrError(f"{opt(label)} {rx!r} is not a valid regular expression ({e})") from None
    headers = list(headers)
    _check_layers(options, {block_index(h.name) for h in headers} - {None})
    copy, default = make_settings("copy"), options.settings
    plans = []
    for h in headers:
        name, shape, dtype = h.name, tuple(h.shape), h.dtype
        layer, mtype = block_index(name), None
        experts = dtype.is_floating_point and is_stacked_experts(name, shape, config)
        if len(shape) == 2 or experts:
            mtype = matrix_type(name)
        ok = _compressible(shape, dtype) or experts
        default_pick = ok and (name.endswith(".weight") or experts) and layer is not None \
            and not _LEAVE_ALONE.search(name) and mtype != "router"  # MoE routers: tiny and sensitive, left alone
        pick = default_pick
        reason = "block linear weight" if pick else (_not_compressible(shape, dtype) if not ok else "left alone")
        if options.include is not None:
            pick = ok and re.search(options.include, name) is not None
            reason = "--include" if pick else reason
        if pick and options.exclude is not None and re.search(options.exclude, name):
            pick, reason = False, "--exclude"
        if pick and options.layers is not None and layer not in options.layers:
            pick, reason = False, "--layers"
        if pick and options.types is not None and mtype not in options.types:
            pick, reason = False, "--types"
        settings = default if pick else copy
        if ok:
            for i, rule in enumerate(options.rules):
                if rule.matches(name, layer, mtype):
                    settings, reason = rule.settings, f"recipe rule {i + 1}"
                    break
        transposed = settings.method != "copy" and (experts_in_major(config) if experts else
                                                    conv1d and layer is not None and len(shape) == 2)
        plans.append(TensorPlan(name, shape, dtype, settings, transposed, layer, mtype, reason))
    check_collisions(plans)
    return plans
