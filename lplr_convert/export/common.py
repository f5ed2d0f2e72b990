"""What the exports share: where each stored tensor of a conversion goes (`plan_export`), the output-directory policy
of a replaceable output (`locked_output`), the shards + index of a checkpoint, and the export's own record.

Placement rule, one for every format so that a compressed-tensors base and a PEFT adapter of the same conversion
always add up to the conversion's model:
- an integer-quantized full-size matrix (rtn, gptq, qlr's backbone Q) of an nn.Linear whose spec compressed-tensors
  can express (`pack_reason`) is written packed; everything else is dense in the source dtype, with a reason;
- a qlr weight with a low-rank correction on an nn.Linear or a transformers Conv1D contributes its backbone Q to the
  base and L R to the adapter; on anything else (fused 3-D experts, no such module) its whole W = Q + L R is dense
  in the base and nothing goes to the adapter.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import __version__
from .. import constants as C
from ..dtypes import dtype_from_name
from ..errors import LplrError, opt
from ..experts import EXPERTS_KEY
from ..io.manifest import TensorRecord, write_json_atomic
from ..io.outdir import OutputLock, check_paths, clear_listed, entries
from ..io.output import ConvertedOutput
from ..io.writer import ShardWriter, write_index
from ..math import quantize as qz
from ..methods import get_method

__all__ = ["ExportPlan", "ExportResult", "Placement", "base_tensor", "finish_shards", "locked_output", "pack_reason",
           "plain_config", "plan_export", "previous_export", "side_files_of", "write_record"]

LINEAR, CONV1D = "linear", "conv1d"
COPIED = "copied by the conversion"


def side_files_of(output: ConvertedOutput) -> list[tuple[str, Path]]:
    """The files the conversion copied from its source (config.json, tokenizer, ...): the manifest's files minus
    the index."""
    return [(rel, output.root / rel) for rel in sorted(output.manifest.files) if rel != C.SAFE_INDEX]


def plain_config(output: ConvertedOutput) -> dict | None:
    """The source's config.json as the conversion copied it, without what convert added (its quantization_config and
    the import guard); None when there is none."""
    path = output.root / C.CONFIG_FILE
    if not path.is_file():
        return None
    config = json.loads(path.read_text(encoding="utf-8"))
    config.pop("quantization_config", None)
    config.pop(C.CONFIG_WEIGHTS_KEY, None)
    return config


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


@dataclass
class ExportPlan:
    placements: list[Placement]
    linear_modules: list[str]  # every nn.Linear of the model, in model order
    architecture: str  # the model class config.json names (module names are this class's)


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
    from ..modeling import model_class, params_on_meta

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
    method = get_method(rec.method)
    p = Placement(rec, module if kind else None, kind)
    q = rec.info.get("q") if C.PART_QUANT in method.parts and EXPERTS_KEY not in rec.info else None
    spec = qz.QuantSpec.from_json(q) if q else None
    correction = method.has_base and rec.info.get("left") is not None
    p.adapter = correction and kind is not None
    if rec.method == "copy":
        p.reason = COPIED
    elif EXPERTS_KEY in rec.info:
        p.reason = "fused 3-D experts tensor (compressed-tensors packs nn.Linear weights)"
    elif spec is None:
        p.reason = f"method {rec.method} stores no integer-quantized full-size matrix"
    elif kind != LINEAR:
        p.reason = "no nn.Linear of this name in the model transformers builds" if kind is None else \
            "Conv1D module: compressed-tensors packs nn.Linear weights"
    elif rec.transposed or list(spec.shape) != list(rec.shape):
        p.reason = "stored transposed against its nn.Linear"
    else:
        p.reason = pack_reason(spec)
        p.spec = None if p.reason else spec
    if p.adapter and p.spec is None:
        p.reason += "; the base holds its backbone Q"
    elif correction and not p.adapter:
        p.folded = True
        p.reason += "; Q + L R written dense (a LoRA adapter needs an nn.Linear or Conv1D)"
    return p


def plan_export(output: ConvertedOutput) -> ExportPlan:
    """The placement of every record of `output` (module names from a meta-device model of its config.json)."""
    from ..modeling import find_module

    model, prefix = _modules(output.root)
    names = dict(model.named_modules())
    placements = []
    for rec in output.records:
        found = find_module(model, rec.name, prefix, names) if rec.name.endswith(".weight") else None
        placements.append(_place(rec, *(found[0], _kind(found[1], rec)) if found else (None, None)))
    linear = [name for name, mod in names.items() if isinstance(mod, torch.nn.Linear)]
    return ExportPlan(placements, linear, type(model).__name__)


def base_tensor(output: ConvertedOutput, p: Placement, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The dense tensor the base holds for `p`, in its source name's shape and dtype: the backbone Q when the
    correction goes to the adapter, else the decoded weight."""
    if not p.adapter:
        return output.dense(p.rec, parts)
    Q = get_method(p.rec.method).decode_base(parts, p.rec.info)
    Q = Q.T if p.rec.transposed else Q  # Conv1D weights stored out x in
    return Q.to(dtype_from_name(p.rec.dtype)).contiguous()


# ------------------------------------------------------------------------------------------ output directories


def previous_export(out: Path) -> set[str] | None:
    """The files an earlier export wrote in `out`, by its record (None when `out` holds no readable record)."""
    try:
        files = json.loads((out / C.EXPORT_FILE).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(files, list):
        return None
    return {str(f) for f in files} | {C.EXPORT_FILE}


def _prepare(out: Path, overwrite: bool, previous: Callable[[Path], set[str] | None], what: str) -> None:
    if not out.is_dir() or not entries(out):
        return
    if not overwrite:
        raise LplrError(f"{opt('out_path')} {out} is not empty; pass {opt('overwrite')} to replace an earlier {what} "
                        f"or choose an empty directory")
    if out.is_symlink():
        raise LplrError(f"{opt('out_path')} {out} is a symbolic link; {opt('overwrite')} does not delete through "
                        f"links, pass the real directory {out.resolve()}")
    listed = previous(out)
    if listed is None:
        raise LplrError(f"{opt('out_path')} {out} is not empty and holds no earlier {what}, so {opt('overwrite')} "
                        f"will not delete it; choose an empty directory")
    clear_listed(out, listed, f"an earlier {what} of this output")


@contextlib.contextmanager
def locked_output(src_root: Path, out: Path, overwrite: bool, previous: Callable[[Path], set[str] | None],
                  what: str) -> Iterator[None]:
    """Check the paths, lock `out`, and make it writable: new or empty, or with `overwrite` holding only an earlier
    `what` whose files `previous(out)` lists (exactly those are deleted; anything else there refuses the run)."""
    check_paths(src_root, out)
    with OutputLock(out) as lock:
        try:
            _prepare(out, overwrite, previous, what)
        except LplrError:
            lock.discard()
            raise
        yield


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
