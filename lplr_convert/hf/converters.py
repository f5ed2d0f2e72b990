"""What the lplr-convert quantizer does inside transformers' `from_pretrained`: the load plan (which stored weight goes
where), the meta-device LowRankLinear layers put in before loading, and the weight converters that turn stored parts
(bit-packed codes + scales) into the parameters of those layers, or into dense weights.

Imports transformers' loading internals (`core_model_loading`); `hf.quantizer` imports this module only when a
model is being loaded.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps, WeightConverter, dot_natural_key

from .. import constants as C
from ..dtypes import dtype_from_name, dtype_name
from ..errors import LplrError
from ..io.manifest import TensorRecord
from ..io.output import ConvertedOutput, decode_record
from ..methods import get_method
from .mapping import converter_matches, renamed
from .modeling import (
    LowRankLinear,
    factors_for,
    float32_kept,
    linear_shape,
    linear_target,
    name_candidates,
    packed_for,
    packed_target,
    set_module,
)
from .tying import untie_replaced

__all__ = ["CopiedConverter", "DecodeFirst", "LoadPlan", "PartsConverter", "converted_root", "wrap_model_converters"]

_PLACEHOLDER = "lplr_convert_parts"  # the converters' nominal target; their rename_source_key names the real one
_COPIED = "lplr_convert_copied"  # the copied-tensor converter's one (nominal) source pattern


def converted_root(checkpoint_files: list[str] | None, name_or_path: str | None) -> Path:
    """The converted directory holding `checkpoint_files` and its manifest (fetched into the same Hub cache snapshot
    when transformers downloaded only the weights)."""
    if not checkpoint_files:
        raise LplrError("from_pretrained found no weight files to load; pass an lplr-convert output directory")
    root = Path(checkpoint_files[0]).parent
    if not (root / C.MANIFEST_FILE).is_file() and name_or_path and not Path(name_or_path).exists():
        from transformers.utils import cached_file

        try:  # a Hub snapshot: the manifest of the same commit lands beside the shards
            cached_file(name_or_path, C.MANIFEST_FILE, revision=root.name)
        except OSError:
            pass
    if not (root / C.MANIFEST_FILE).is_file():
        raise LplrError(f"{root} has no {C.MANIFEST_FILE} beside its weights; pass the complete lplr-convert output")
    return root


@dataclass
class _Target:
    key: str  # the model parameter the record's parts load into ("<module>.left" for a factored layer)
    module: nn.Module | None = None  # the linear a LowRankLinear or PackedLinear replaced
    layout: object = None  # the stored matrices (PackedLayout) of a record loaded into a PackedLinear
    name: str = ""  # that PackedLinear's module name


@dataclass
class LoadPlan:
    """Every packed record of a converted directory (stored as parts, not under its own name) and its place."""

    output: ConvertedOutput
    records: dict[str, TensorRecord]  # packed records by checkpoint name
    suffixes: tuple[str, ...]  # every stored-name suffix of a packed record, longest first
    targets: dict[str, _Target] = field(default_factory=dict)
    loaded: set[str] = field(default_factory=set)
    aliases: dict[str, str] = field(default_factory=dict)  # a record's name after the model's renamings -> name
    renamed: dict[str, str] = field(default_factory=dict)  # the reverse
    kept: Callable[[str], bool] = lambda name: False  # parameters transformers keeps in float32 (T5's wo in float16)
    packed: bool = True  # PackedLinear modules (else float LowRankLinear / dense weights: `dequantize=True`)
    kernel: str | None = None
    # float tensors stored under their own name (copied, laser) that load into a model parameter by name: the name
    # transformers' converters see (after the model's renamings) -> parameter; and checkpoint name -> (record, parameter)
    copied: dict[str, str] = field(default_factory=dict)
    copied_records: dict[str, tuple[TensorRecord, str]] = field(default_factory=dict)

    @classmethod
    def build(cls, model: nn.Module, root: Path, checkpoint_files: list[str], dtype=None, packed: bool = True,
              kernel: str | None = None) -> LoadPlan:
        """Check the directory (manifest integrity, every shard's sha256, the weight files transformers will read) and
        put a meta-device PackedLinear in place of every linear whose weight is stored as quantized matrices (with
        `packed`), else a meta-device LowRankLinear in place of every linear that a factored record compresses (in
        float32 where transformers keeps the module in float32 when it loads in `dtype`)."""
        output = ConvertedOutput(root)
        output.side_file(C.CONFIG_FILE)  # the model was built from it: checked like the shards
        output.side_file(C.SAFE_INDEX)  # transformers reads it: never through a link
        for shard in output.manifest.shards:
            output.check_shard(shard)
        output.verify = False  # every shard is checked above, once
        reading = {Path(f).name for f in checkpoint_files}
        if reading != set(output.manifest.shards):
            raise LplrError(f"the weight files of {root} ({', '.join(sorted(reading))}) are not the shards its manifest "
                            f"lists; the directory was modified, re-run the conversion")
        records = {r.name: r for r in output.records if any(full != r.name for full in r.stored)}
        suffixes = {full[len(r.name) + 1:] for r in records.values() for full in r.stored}
        plan = cls(output, records, tuple(sorted(suffixes, key=len, reverse=True)), packed=packed, kernel=kernel)
        plan.kept = float32_kept(model, dtype if isinstance(dtype, torch.dtype) else None)
        plan._place(model)
        return plan

    def learn_renamings(self, conversions: list, model: nn.Module) -> None:
        """The names the model's own renamings give the records (transformers applies them to every checkpoint key,
        our parts included, before any converter): aliases, and the parameters renamed records load into."""
        prefix = getattr(model, "base_model_prefix", "") or ""
        keys = set(model.state_dict().keys())
        for rec in self.records.values():
            new_name = renamed(rec.name, conversions)
            if new_name != rec.name:
                self.aliases[new_name], self.renamed[rec.name] = rec.name, new_name
                key = next((k for k in name_candidates(new_name, prefix) if k in keys), None)
                if key is not None and rec.name not in self.targets:
                    self.targets[rec.name] = _Target(key)
        params = dict(model.named_parameters())
        for rec in self.output.records:
            if rec.name in self.records or rec.shard is None or not dtype_from_name(rec.dtype).is_floating_point:
                continue
            new_name = renamed(rec.name, conversions)
            key = next((k for k in name_candidates(new_name, prefix) if k in params), None)
            if key is not None and params[key].is_floating_point():
                self.copied[new_name], self.copied_records[rec.name] = key, (rec, key)

    def model_name(self, rec: TensorRecord) -> str:
        """The record's name as the model's converters see it (after the model's renamings)."""
        return self.renamed.get(rec.name, rec.name)

    def _place(self, model: nn.Module) -> None:
        prefix = getattr(model, "base_model_prefix", "") or ""
        names = dict(model.named_modules())
        keys = set(model.state_dict().keys())
        for rec in self.records.values():
            packed = packed_target(model, rec, prefix, names) if self.packed else None
            if packed is not None:
                name, mod, layout = packed
                dtype = torch.float32 if self.kept(rec.name) else mod.weight.dtype
                new = packed_for(mod, rec, layout, None, "cpu", dtype, self.kernel)
                set_module(model, name, new)
                untie_replaced(model, name)
                new._is_hf_initialized = True  # loaded whole from the checkpoint (see below)
                model.get_submodule(name.rpartition(".")[0])._is_hf_initialized = True
                first = next(k for k in new.state_dict() if k != "bias")
                self.targets[rec.name] = _Target(f"{name}.{first}", mod, layout, name)
                continue
            hit = linear_target(model, rec, prefix, names)
            if hit is not None:
                new = _meta_lowrank(hit[1], rec, torch.float32 if self.kept(rec.name) else hit[1].weight.dtype)
                set_module(model, hit[0], new)
                untie_replaced(model, hit[0])
                # transformers initialises every module not marked as initialised, and some `_init_weights` write
                # `child.weight` (GPT-2: c_proj), which on a LowRankLinear forms L @ R: the factored layer and its
                # parent are loaded whole from the checkpoint, so neither is initialised.
                new._is_hf_initialized = True
                model.get_submodule(hit[0].rpartition(".")[0])._is_hf_initialized = True
                self.targets[rec.name] = _Target(f"{hit[0]}.left", hit[1])
                continue
            key = next((k for k in name_candidates(rec.name, prefix) if k in keys), None)
            if key is not None:
                self.targets[rec.name] = _Target(key)

    def split(self, key: str) -> tuple[TensorRecord, str] | None:
        """(record, part suffix) of a stored tensor name, or None when it is no part of a packed record."""
        for suffix in self.suffixes:
            if key.endswith("." + suffix):
                stem = key[: -len(suffix) - 1]
                rec = self.records.get(stem) or self.records.get(self.aliases.get(stem, ""))
                if rec is not None and f"{rec.name}.{suffix}" in rec.stored:
                    return rec, suffix
        return None

    def unloaded(self) -> list[str]:
        return sorted(set(self.records) - self.loaded, key=dot_natural_key)

    def decode(self, rec: TensorRecord, parts: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        """The model parameters of one record from its parts: {"<module>.left": L, "<module>.right": R} for a
        factored layer, else {param: dense} (in the dtype of the model's parameter, decoded like the loaders do)."""
        self._check_parts(rec, parts)
        parts = self._own_copy(rec, parts)
        target = self.targets.get(rec.name)
        self.loaded.add(rec.name)
        if target is not None and target.layout is not None:
            device = next(iter(parts.values())).device
            dtype = model.get_submodule(target.name).dtype  # what the meta module was built for: the same kernels
            # laid out as the meta twin was (for the CPU) wherever transformers put the parts: the same buffers;
            # `balance` lays them out for their device after loading
            new = packed_for(target.module, rec, target.layout, parts, device, dtype, self.kernel, plan_device="cpu")
            return {f"{target.name}.{k}": v for k, v in new.state_dict().items() if k != "bias"}
        if target is not None and target.module is not None:
            L, R, base = factors_for(target.module, rec, parts)
            module = target.key.removesuffix(".left")
            dtype = model.get_parameter(target.key).dtype
            out = {target.key: L.to(dtype).contiguous(), f"{module}.right": R.to(dtype).contiguous()}
            if base is not None:
                out[f"{module}.base"] = base.to(dtype).contiguous()
            return out
        W = decode_record(rec, parts)
        if target is None:  # a model converter places it (e.g. per-expert weights fused into one parameter)
            return {rec.name: W}
        return {target.key: _cast(W, self.param_dtype(model, target.key))}

    def _own_copy(self, rec: TensorRecord, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The parts as read by the output's reader (positioned reads into memory of their own) where transformers
        gave CPU tensors: those view its memory map of the shard, which any one of them kept by a packed module
        would hold open, with every page touched while loading resident, for the model's life. Parts transformers
        already placed on another device are used as they are."""
        if any(t.device.type != "cpu" for t in parts.values()):
            return parts
        return self.output.parts(rec)

    def param_dtype(self, model: nn.Module, key: str) -> torch.dtype:
        """The dtype transformers loads parameter `key` in: the model's, or float32 where it keeps the module so."""
        return torch.float32 if self.kept(key) else model.get_parameter(key).dtype

    def _check_parts(self, rec: TensorRecord, parts: dict[str, torch.Tensor]) -> None:
        want = {full[len(rec.name) + 1:] for full in rec.stored}
        if set(parts) != want:
            raise LplrError(f"{rec.name}: transformers passed the parts {sorted(parts)}, the manifest lists "
                            f"{sorted(want)}; load it with lplr_convert.load_model instead")
        for suffix, t in parts.items():
            meta = rec.stored[f"{rec.name}.{suffix}"]
            if list(t.shape) != list(meta["shape"]) or dtype_name(t.dtype) != meta["dtype"]:
                raise LplrError(f"stored tensor {rec.name}.{suffix} has {t.dtype} {list(t.shape)}, the manifest says "
                                f"{meta['dtype']} {meta['shape']}; the output is damaged, re-run the conversion")


def _meta_lowrank(mod: nn.Module, rec: TensorRecord, dtype: torch.dtype) -> LowRankLinear:
    out_f, in_f = linear_shape(mod)
    bias = None if getattr(mod, "bias", None) is None else torch.empty(out_f, dtype=dtype, device="meta")
    layout = get_method(rec.method).layout(rec.info)
    base = torch.empty(out_f, in_f, dtype=dtype, device="meta") if layout is not None and layout.backbone else None
    return LowRankLinear(torch.empty(out_f, rec.rank, dtype=dtype, device="meta"),
                         torch.empty(rec.rank, in_f, dtype=dtype, device="meta"), bias, base)


def _cast(W: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return W.to(dtype) if W.is_floating_point() and dtype.is_floating_point else W


class _Passthrough(ConversionOps):
    """Marks a converter whose own `convert` decodes the parts first (allows many sources to many targets)."""

    supports_many_to_many = True

    def convert(self, input_dict, source_patterns=None, target_patterns=None, **kwargs):
        return input_dict

    @property
    def reverse_op(self) -> ConversionOps:
        return self


class _PartsMixin:
    """What both converters share: the plan (shared, not copied, by the per-target copies transformers makes) and
    the checkpoint key of every tensor collected, by source pattern, in collection order."""

    def _init_parts(self, plan: LoadPlan) -> None:
        self.plan = plan
        self.sources: dict[str, list[str]] = {}

    def __deepcopy__(self, memo):
        return self.copy(self._original_source_patterns, self._original_target_patterns)

    def add_tensor(self, target_key: str, source_key: str, source_pattern: str, future) -> None:
        super().add_tensor(target_key, source_key, source_pattern, future)
        self.sources.setdefault(source_pattern, []).append(source_key)

    def collected(self) -> list[tuple[str, str, torch.Tensor]]:
        """(source pattern, checkpoint key, tensor) of everything collected, in collection order."""
        return [(p, key, t) for p, ts in self.materialize_tensors().items() for key, t in zip(self.sources[p], ts)]

    def parts_by_record(self, items) -> dict[str, dict[str, torch.Tensor]]:
        out: dict[str, dict[str, torch.Tensor]] = {}
        for _, key, t in items:
            rec, suffix = self.plan.split(key)
            out.setdefault(rec.name, {})[suffix] = t
        return out

    @staticmethod
    def part_pattern(suffix: str) -> str:
        return re.escape(suffix)


class PartsConverter(_PartsMixin, WeightConverter):
    """Collects every stored part of a packed record under the model parameter it becomes (see LoadPlan.targets)
    and decodes them there."""

    def __init__(self, plan: LoadPlan, source_patterns=None, target_patterns=None, **kwargs):
        super().__init__(source_patterns or [self.part_pattern(s) for s in plan.suffixes],
                         target_patterns or _PLACEHOLDER, [_Passthrough()])
        self._init_parts(plan)

    def copy(self, source_patterns, target_patterns, **kwargs):
        new = type(self)(self.plan, source_patterns, target_patterns)
        new.scope_prefix, new.base_model_prefix = self.scope_prefix, self.base_model_prefix
        return new

    def rename_source_key(self, source_key: str) -> tuple[str, str | None]:
        hit = self.plan.split(source_key)
        target = self.plan.targets.get(hit[0].name) if hit else None
        if target is None:
            return source_key, None
        self._was_used = True
        return target.key, self.part_pattern(hit[1])

    def convert(self, layer_name, model=None, config=None, hf_quantizer=None, loading_info=None):
        out: dict[str, torch.Tensor] = {}
        for name, parts in self.parts_by_record(self.collected()).items():
            out.update(self.plan.decode(self.plan.records[name], parts, model))
        return out


class DecodeFirst(_PartsMixin, WeightConverter):
    """One of the model's own converters (e.g. per-expert weights merged into one fused parameter), extended to
    collect the stored parts of packed records too: they are decoded to the dense weights the converter expects,
    then its operations run as usual."""

    def __init__(self, plan: LoadPlan, source_patterns, target_patterns, operations, force_cpu=False, n_plain=0,
                 **kwargs):
        super().__init__(source_patterns, target_patterns, operations, force_cpu)
        self._init_parts(plan)
        self.n_plain = n_plain
        # extended sources are plain sources x part suffixes, in that order: part pattern -> its plain pattern
        per = max(1, len(plan.suffixes))
        self.plain_of = {p: self.source_patterns[(k - n_plain) // per]
                         for k, p in enumerate(self.source_patterns) if k >= n_plain}

    @classmethod
    def wrap(cls, plan: LoadPlan, conv: WeightConverter) -> DecodeFirst:
        sources = list(conv._original_source_patterns)
        extended = sources + [f"{s}.{cls.part_pattern(x)}" for s in sources for x in plan.suffixes]
        new = cls(plan, extended, list(conv._original_target_patterns), [_Passthrough(), *conv.operations],
                  conv.force_cpu, n_plain=len(sources))
        new.scope_prefix, new.base_model_prefix = conv.scope_prefix, conv.base_model_prefix
        return new

    def copy(self, source_patterns, target_patterns, **kwargs):
        new = type(self)(self.plan, source_patterns, target_patterns, kwargs.get("operations", self.operations),
                         self.force_cpu, n_plain=self.n_plain)
        new.scope_prefix, new.base_model_prefix = self.scope_prefix, self.base_model_prefix
        return new

    def convert(self, layer_name, model=None, config=None, hf_quantizer=None, loading_info=None):
        items = self.collected()
        dense: dict[str, list[tuple[str, torch.Tensor]]] = {}
        for p, key, t in items:
            if p not in self.plain_of:
                dense.setdefault(p, []).append((key, t))
        plain_of_record = {self.plan.split(key)[0].name: self.plain_of[p] for p, key, _ in items if p in self.plain_of}
        for name, parts in self.parts_by_record([i for i in items if i[0] in self.plain_of]).items():
            W = self.plan.decode(self.plan.records[name], parts, model)[name]
            dense.setdefault(plain_of_record[name], []).append((name, W))
        dtype = self.plan.param_dtype(model, layer_name) if model is not None else None
        for p, pairs in dense.items():  # checkpoint order: the order the model's operations expect
            pairs.sort(key=lambda kv: dot_natural_key(kv[0]))
            self.collected_tensors[p] = [t if dtype is None else _cast(t, dtype) for _, t in pairs]
        return WeightConverter.convert(self, layer_name, model, config, hf_quantizer, loading_info)


class CopiedConverter(WeightConverter):
    """Collects every float tensor stored under its own name that loads into a model parameter by name (`LoadPlan.copied`;
    the model's own converters take theirs first) and reads it with the output's reader in the parameter's dtype
    (`LoadPlan.copied_tensor`): transformers would cast it from its memory map of the shard, whose touched pages stay
    resident until the whole load ends (a float32 embedding loaded in bfloat16: its float32 bytes beside the copy)."""

    def __init__(self, plan: LoadPlan, source_patterns=None, target_patterns=None, **kwargs):
        super().__init__(source_patterns or [_COPIED], target_patterns or _PLACEHOLDER, [_Passthrough()])
        self.plan = plan
        self.names: list[str] = []

    def __deepcopy__(self, memo):
        return self.copy(self._original_source_patterns, self._original_target_patterns)

    def copy(self, source_patterns, target_patterns, **kwargs):
        new = type(self)(self.plan, source_patterns, target_patterns)
        new.scope_prefix, new.base_model_prefix = self.scope_prefix, self.base_model_prefix
        return new

    def rename_source_key(self, source_key: str) -> tuple[str, str | None]:
        key = self.plan.copied.get(source_key)
        if key is None:
            return source_key, None
        self._was_used = True
        return key, _COPIED

    def add_tensor(self, target_key: str, source_key: str, source_pattern: str, future) -> None:
        super().add_tensor(target_key, source_key, source_pattern, future)
        self.names.append(source_key)

    def convert(self, layer_name, model=None, config=None, hf_quantizer=None, loading_info=None):
        given = [t for ts in self.materialize_tensors().values() for t in ts]  # views of the map, untouched
        out = {}
        for name, t in zip(self.names, given):
            rec, key = self.plan.copied_records[name]
            dtype = self.plan.param_dtype(model, key)
            # read into `dtype` a block at a time; a tensor transformers placed on another device: cast as given
            out[key] = self.plan.output.dense_as(rec, dtype, t.device) if t.device.type == "cpu" else _cast(t, dtype)
        return out


def wrap_model_converters(plan: LoadPlan, conversions: list) -> list:
    """The model's conversions with every converter that a packed record's name matches extended to decode it."""
    names = [plan.model_name(rec) for rec in plan.records.values()]
    return [DecodeFirst.wrap(plan, conv) if converter_matches(conv, names) else conv for conv in conversions]
