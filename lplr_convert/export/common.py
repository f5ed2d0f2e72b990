"""What the exports share: where each stored tensor of a conversion goes (`plan_export`), the output-directory policy
of an export (`previous_export`), the shards + index of a checkpoint, and the export's own record.

Placement rule, one for every format so that a compressed-tensors base and a PEFT adapter of the same conversion
always add up to the conversion's model:
- an integer-quantized full-size matrix (rtn, gptq, qlr's backbone Q) of an nn.Linear whose spec compressed-tensors
  can express (`pack_reason`) is written packed, in one scheme per export (`_one_scheme`); everything else is dense
  in the source dtype, with a reason;
- per-expert weights that transformers merges into one fused parameter on load (Mixtral's `experts.N.w1`, ...) are
  packed like linears; a compressed-tensors base in which one of them cannot be (or a family whose modules
  transformers rebuilds for such checkpoints into a layout the tensors do not fill) is refused (`_check_loadable`);
- a qlr weight with a low-rank correction on an nn.Linear or a transformers Conv1D contributes its backbone Q to the
  base and L R to the adapter; on anything else (fused 3-D experts, no such module) its whole W = Q + L R is dense
  in the base and nothing goes to the adapter.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import __version__
from .. import constants as C
from ..dtypes import dtype_from_name
from ..errors import LplrError
from ..io.manifest import TensorRecord, write_json_atomic
from ..io.outdir import clear_listed, entries, recorded_files, replaceable_output
from ..io.output import ConvertedOutput
from ..io.writer import ShardWriter, write_index
from ..math import quantize as qz
from ..methods import get_method
from ..methods.base import PackedLayout
from ..pipeline.experts import EXPERTS_KEY

__all__ = ["EXPORT_RETRY", "EXPORT_WHAT", "ExportPlan", "ExportResult", "Placement", "base_tensor", "exporting",
           "finish_shards", "pack_reason", "plain_config", "plan_export", "previous_export", "scheme_of",
           "side_files_of", "write_record"]

LINEAR, CONV1D, MERGED = "linear", "conv1d", "merged"  # MERGED: a per-expert weight transformers fuses on load
EXPORT_WHAT = "export or decompress"  # what an export record lists, named in --overwrite refusals
COPIED = "copied by the conversion"


def side_files_of(output: ConvertedOutput) -> list[tuple[str, Path]]:
    """The files the conversion copied from its source (config.json, tokenizer, ...): the manifest's files minus
    the index, each checked against its sha256 (a file changed after the conversion is refused, as the loaders do)."""
    return [(rel, output.side_file(rel)) for rel in sorted(output.manifest.files) if rel != C.SAFE_INDEX]


def plain_config(output: ConvertedOutput) -> dict | None:
    """The source's config.json as the conversion copied it, without what convert added (its quantization_config and
    the import guard); None when there is none."""
    path = output.side_file(C.CONFIG_FILE)  # checked against the manifest
    if path is None:
        return None
    config = json.loads(path.read_text(encoding="utf-8"))
    config.pop("quantization_config", None)
    config.pop(C.CONFIG_WEIGHTS_KEY, None)
    return config


# ---------------------------------------------------------------------------------------------------- formats

_FORMATS: dict[str, Callable[..., ExportResult]] = {}


def register_format(name: str):
    """Decorator: `fn(in_path, out_path, *, base_model, max_shard_size, overwrite) -> ExportResult` writes the export
    format `name` (`export --format name`), as `methods.register` makes a method available."""

    def wrap(fn):
        if name in _FORMATS:
            raise ValueError(f"export format {name!r} is registered twice")
        _FORMATS[name] = fn
        return fn

    return wrap


def export_formats() -> list[str]:
    """The registered export formats."""
    return sorted(_FORMATS)


def get_format(name: str) -> Callable[..., ExportResult]:
    """The writer of export format `name`; an unknown name lists the registered ones."""
    try:
        return _FORMATS[name]
    except (KeyError, TypeError):
        raise LplrError(f"export format {name!r} is unknown; use one of {', '.join(export_formats())}") from None


# ------------------------------------------------------------------------------------------------- placement


@dataclass
class Placement:
    """Where one record goes. `module`: its module's name in the model transformers builds from config.json (None:
    not the weight of an nn.Linear or Conv1D); `spec`: the quantized matrix written packed (None: dense, see
    `reason`); `adapter`: its low-rank correction goes to the LoRA adapter and the base holds its backbone Q."""

    rec: TensorRecord
    module: str | None = None
    kind: str | None = None
    spec: qz.QuantSpec | None = None
    reason: str = ""
    adapter: bool = False
    folded: bool = False  # a qlr correction written dense into the base (its module cannot take a LoRA adapter)
    layout: PackedLayout | None = None  # what the method declares the record's parts to be (`Method.layout`)


@dataclass
class ExportPlan:
    placements: list[Placement]
    linear_modules: list[str]  # every nn.Linear of the model, in model order
    architecture: str  # the model class config.json names (module names are this class's)
    weight_readers: str | None = None  # a model class whose weight init reads packed linears' `weight` (see notes)


def scheme_of(spec: qz.QuantSpec) -> tuple:
    """(bits, symmetric, strategy, group_size): what one compressed-tensors config group describes."""
    return spec.bits, spec.scheme == "symmetric", spec.granularity, spec.group_size if spec.granularity == "group" \
        else None


def _describe(key: tuple) -> str:
    bits, symmetric, strategy, group_size = key
    return f"{bits}-bit {'symmetric' if symmetric else 'asymmetric'} {strategy}" + (f" {group_size}" if group_size
                                                                                      else "")


def pack_reason(spec: qz.QuantSpec) -> str:
    """Why compressed-tensors' pack-quantized format cannot hold `spec` losslessly ("" when it can)."""
    n = spec.shape[1]
    if spec.bits not in qz.INT_BITS:
        return f"{spec.bits}-bit float cast, not integer codes"
    if spec.scheme == "minmax":
        return "minmax scheme: its zero is a float, compressed-tensors stores integer zero points"
    if spec.granularity == "channel" and spec.channel_dim != 0:
        return "per-column scales: compressed-tensors scales output rows"
    if spec.granularity == "group" and n % spec.group_size:
        return f"group size {spec.group_size} does not divide its {n} input columns"
    return ""


def _modules(root: Path):
    """(meta-device model of config.json's architecture, its base_model_prefix)."""
    from ..hf.modeling import model_class, params_on_meta

    cls, config = model_class(root)
    with params_on_meta():
        model = cls(config)
    return model, getattr(model, "base_model_prefix", "") or ""


def _kind(module, rec: TensorRecord) -> str | None:
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, torch.nn.Linear) and list(module.weight.shape) == list(rec.shape):
        return LINEAR
    if isinstance(module, Conv1D) and list(module.weight.shape) == list(rec.shape):
        return CONV1D
    return None


def _place(rec: TensorRecord, module: str | None, kind: str | None) -> Placement:
    """Where `rec` goes before the export-wide rules (one scheme, `_annotate`)."""
    p = Placement(rec, module if kind else None, kind)
    p.layout = None if rec.method == "copy" or EXPERTS_KEY in rec.info else get_method(rec.method).layout(rec.info)
    if p.layout is not None and p.layout.transform is not None:
        raise LplrError(f"tensor {rec.name} is stored with --incoherence {p.layout.transform.kind} (codes of a rotated "
                        f"weight U W V^T, which compressed-tensors and peft cannot undo); re-convert without "
                        f"--incoherence to export, or write a dense checkpoint with `lplr-convert decompress`")
    backbone = p.layout.backbone if p.layout is not None else None
    spec = backbone.spec if backbone is not None else None
    correction = backbone is not None and p.layout.low_rank
    p.adapter = correction and kind in (LINEAR, CONV1D)
    p.folded = correction and not p.adapter
    if rec.method == "copy":
        p.reason = COPIED
    elif EXPERTS_KEY in rec.info:
        p.reason = "fused 3-D experts tensor (compressed-tensors packs nn.Linear weights)"
    elif p.layout is None:
        p.reason = f"method {rec.method} declares no packed layout (Method.layout): stored as one dense tensor"
    elif spec is None:
        p.reason = f"method {rec.method} stores no integer-quantized full-size matrix"
    elif kind not in (LINEAR, MERGED):
        p.reason = "no nn.Linear of this name in the model transformers builds" if kind is None else \
            "Conv1D module: compressed-tensors packs nn.Linear weights"
    elif rec.transposed or list(spec.shape) != list(rec.shape):
        p.reason = "stored transposed against its nn.Linear"
    else:
        p.reason = pack_reason(spec)
        p.spec = None if p.reason else spec
    return p


def _one_scheme(placements: list[Placement]) -> None:
    """Keep one packed scheme per export: transformers 5.25 decodes every module of a dequantize=True load (which
    asymmetric weights and PEFT need) with its first config group's scheme, so a second group would load wrong
    without an error. The scheme holding the most parameters stays packed; the others go dense, saying why."""
    sizes: dict[tuple, int] = {}
    for p in placements:
        if p.spec is not None:
            sizes[scheme_of(p.spec)] = sizes.get(scheme_of(p.spec), 0) + math.prod(p.spec.shape)
    if len(sizes) < 2:
        return
    keep = max(sizes, key=sizes.get)
    for p in placements:
        if p.spec is not None and scheme_of(p.spec) != keep:
            p.reason = (f"its scheme ({_describe(scheme_of(p.spec))}) is not the export's one packed scheme "
                        f"({_describe(keep)}): transformers decodes every module with one config group's scheme")
            p.spec = None


def _annotate(p: Placement) -> None:
    if p.adapter and p.spec is None:
        p.reason += "; the base holds its backbone Q"
    elif p.folded:
        p.reason += "; Q + L R written dense (a LoRA adapter needs an nn.Linear or Conv1D)"


def _check_loadable(plan: ExportPlan, model, records: list[TensorRecord], conversions: list, prefix: str) -> None:
    """Refuse a compressed-tensors base that transformers would not load as the conversion's model: a per-expert
    weight it merges on load that is not packed symmetric (its experts path reads only packed weights, without zero
    points: dense ones are dropped), or modules it rebuilds for compressed-tensors checkpoints (Llama 4's fused
    experts become per-expert linears) whose parameters no stored tensor fills (they would stay random)."""
    from ..hf.mapping import renamed
    from ..hf.modeling import name_candidates

    for p in plan.placements:
        problem = _merged_problem(p)
        if problem:
            raise LplrError(f"{p.rec.name}: transformers merges this per-expert weight on load and, from a "
                            f"compressed-tensors checkpoint, reads such weights only packed and symmetric ({problem}); "
                            f"quantize every expert with rtn or gptq and scheme symmetric (e.g. a recipe rule), or use "
                            f"decompress")
    keys = {k for rec in records for k in name_candidates(renamed(rec.name, conversions), prefix)}
    for name, module, new in _rebuilt_for_compressed_tensors(model):
        missing = [f"{name}.{n}" for n, _ in new.named_parameters() if f"{name}.{n}" not in keys]
        if missing:
            raise LplrError(f"transformers loads {type(module).__name__} ({name}) of a compressed-tensors checkpoint "
                            f"as {type(new).__name__}, whose parameters (e.g. {missing[0]}) no tensor of this "
                            f"conversion fills, so they would stay random; load the conversion with from_pretrained "
                            f"or decompress it")


def _merged_problem(p: Placement) -> str:
    """Why transformers cannot load the merged per-expert weight of `p` from a compressed-tensors base ("" if it
    can, or if `p` is no such weight)."""
    if p.kind != MERGED:
        return ""
    if p.folded:
        return "a qlr correction, which neither a compressed-tensors base nor a LoRA adapter holds there"
    if p.spec is None:
        return p.reason
    return "" if p.spec.scheme == "symmetric" else "asymmetric: transformers decodes packed experts without zero points"


def _rebuilt_for_compressed_tensors(model) -> list[tuple[str, torch.nn.Module, torch.nn.Module]]:
    """(name, module, its replacement) for each module transformers replaces before loading a compressed-tensors
    checkpoint (`MODULES_TO_PATCH_FOR_QUANTIZATION`), built on the meta device as transformers does."""
    try:
        from transformers.quantizers.base import MODULES_TO_PATCH_FOR_QUANTIZATION as patches
    except ImportError:  # a transformers without the table rebuilds nothing
        return []
    out = []
    for name, module in model.named_modules():
        entry = patches.get(type(module).__name__)
        if entry is not None and C.CT_QUANT_METHOD in entry["quantization_methods"]:
            with torch.device("meta"):
                out.append((name, module, entry["module_name"](model.config.get_text_config())))
    return out


def _weight_readers(model, packed: list[str]) -> str | None:
    """The model class when its weight initialisation reads `weight` of a packed linear (T5, Falcon), which
    transformers' default compressed-tensors path removes before it initialises what the checkpoint did not fill
    (AttributeError); None otherwise. Probed on the meta-device skeleton, whose packed weights are dropped."""
    for name in packed:
        model.get_submodule(name)._parameters.pop("weight", None)
    for module in model.modules():
        try:
            model._init_weights(module)
        except AttributeError:
            return type(model).__name__
        except Exception:  # noqa: BLE001, S112  (failing on the meta device for another reason says nothing here)
            continue
    return None


def plan_export(output: ConvertedOutput) -> ExportPlan:
    """The placement of every record of `output` (module names from a meta-device model of its config.json);
    raises LplrError when transformers could not load the compressed-tensors base as the conversion's model."""
    from ..hf.mapping import merged_names, model_conversions
    from ..hf.modeling import find_module

    side_files_of(output)  # checked before anything is written (config.json builds the model)
    model, prefix = _modules(output.root)
    names = dict(model.named_modules())
    conversions = model_conversions(model)
    merged = merged_names([r.name for r in output.records if len(r.shape) == 2], conversions)
    placements = []
    for rec in output.records:
        found = find_module(model, rec.name, prefix, names) if rec.name.endswith(".weight") else None
        where = (rec.name.removesuffix(".weight"), MERGED) if rec.name in merged and found is None else \
            (found[0], _kind(found[1], rec)) if found else (None, None)
        placements.append(_place(rec, *where))
    _one_scheme(placements)
    for p in placements:
        _annotate(p)
    linear = [name for name, mod in names.items() if isinstance(mod, torch.nn.Linear)]
    plan = ExportPlan(placements, linear, type(model).__name__)
    if any(p.spec is not None for p in placements):
        _check_loadable(plan, model, output.records, conversions, prefix)
        plan.weight_readers = _weight_readers(model, [p.module for p in placements if p.spec and p.kind == LINEAR])
    return plan


def base_tensor(output: ConvertedOutput, p: Placement, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The dense tensor the base holds for `p`, in its source name's shape and dtype: the backbone Q when the
    correction goes to the adapter, else the decoded weight."""
    if not p.adapter:
        return output.dense(p.rec, parts)
    Q = p.layout.backbone.dequantized(parts)
    Q = Q.T if p.rec.transposed else Q  # Conv1D weights stored out x in
    return Q.to(dtype_from_name(p.rec.dtype)).contiguous()


# ------------------------------------------------------------------------------------------ output directories


# How an export goes on after a failed write: it removes what it wrote, so the command is simply run again.
EXPORT_RETRY = "run the command again (the partial output was removed)"
# Shard files of the writer: partial, data, temporary and final names.
_SHARD_FILE = re.compile(r"model-\d{5}(-of-\d{5})?\.safetensors(\.partial)?(\.data)?")


def previous_export(out: Path) -> set[str] | None:
    """The files an earlier export or decompress wrote in `out`: by its record, or, for one that was killed before
    writing it, by its progress marker (the names it announced, their temporary names, and the shard writer's
    files). None when `out` holds neither (it is not an export of this tool)."""
    listed = recorded_files(out / C.EXPORT_FILE)
    if listed is not None:
        return listed | {C.EXPORT_PROGRESS}
    announced = recorded_files(out / C.EXPORT_PROGRESS)
    if announced is None:
        return None
    shards = {e for e in entries(out) if _SHARD_FILE.fullmatch(e)}
    return announced | {f + C.PARTIAL_SUFFIX for f in announced} | shards


@contextlib.contextmanager
def exporting(src_root: Path, out: Path, overwrite: bool, names: list[str]):
    """The output directory of an export or decompress, locked and cleared (an earlier export, or the leftovers of
    one that was killed, are replaced with `overwrite`). A progress marker listing `names` (every file it may write
    besides the shards) is written first and removed after the record. When the export fails (a full disk, a file
    size limit, an error, an interrupt), everything it wrote is removed, which gives the space back and leaves no
    output that looks usable; a write that failed for want of space is one line naming the fix."""
    with replaceable_output(src_root, out, overwrite, previous_export, EXPORT_WHAT):
        try:
            write_json_atomic(out / C.EXPORT_PROGRESS, {"tool": C.TOOL_NAME, C.M_FILES: sorted(
                {*names, C.EXPORT_FILE, C.SAFE_SINGLE, C.SAFE_INDEX})})
            yield
            (out / C.EXPORT_PROGRESS).unlink()
        except BaseException as e:
            clear_listed(out, entries(out), "this export")  # all of it is this run's: `out` held nothing else
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                raise LplrError(f"writing {out} failed ({os.strerror(e.errno)}); free disk space and "
                                f"{EXPORT_RETRY}") from None
            raise


def finish_shards(writer: ShardWriter, out: Path, total_size: int) -> list[str]:
    """Close the shards: one shard becomes `model.safetensors`, several get an index. Returns the files written."""
    weight_map, _ = writer.finalize()
    if len(writer.closed) == 1:
        (out / next(iter(set(weight_map.values())))).rename(out / C.SAFE_SINGLE)
        return [C.SAFE_SINGLE]
    write_index(out, weight_map, total_size)
    return [*sorted(set(weight_map.values())), C.SAFE_INDEX]


# ----------------------------------------------------------------------------------------------- the record


@dataclass
class ExportResult:
    """What an export wrote: `packed` modules, `dense` (name, reason) pairs, `adapter` modules (name -> rank) and
    notes for the user (what loads where, what is left out)."""

    out: Path
    format: str
    source: str
    packed: list[str] = field(default_factory=list)
    dense: list[tuple[str, str]] = field(default_factory=list)
    adapter: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"tool": C.TOOL_NAME, "tool_version": __version__, "format": self.format, "source": self.source,
                "files": sorted(self.files), "packed": self.packed,
                "dense": [{"name": n, "reason": r} for n, r in self.dense], "adapter": self.adapter,
                "notes": self.notes}

    def lines(self) -> list[str]:
        """The command's summary: counts, each compressed tensor that went dense with its reason, the notes."""
        if self.adapter:
            ranks = sorted(set(self.adapter.values()))
            out = [f"wrote {self.format} export to {self.out}: {len(self.adapter)} LoRA modules, rank "
                   f"{ranks[0]}" + (f"-{ranks[-1]}" if len(ranks) > 1 else "")]
        else:
            copied = sum(reason == COPIED for _, reason in self.dense)
            out = [(f"wrote {self.format} export to {self.out}: {len(self.packed)} packed, {len(self.dense)} dense "
                   f"({copied} {COPIED})")]
        out += [f"  dense: {n} ({r})" for n, r in self.dense if r != COPIED]
        return out + [f"note: {n}" for n in self.notes]


def write_record(result: ExportResult) -> None:
    """Write `lplr_export.json` (the record `--overwrite` trusts) last."""
    write_json_atomic(result.out / C.EXPORT_FILE, result.to_json())
