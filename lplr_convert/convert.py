"""The pipeline: source reader -> plan -> method on the device -> shard writer -> index, manifest, report.

Orchestration only: the pieces live in `io/` (reader, writer, journal, output-directory policy, side files,
manifest), `plan.py` and `methods/`.
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from loguru import logger
from tqdm import tqdm

from . import __version__
from . import constants as C
from .allocation import allocate_plans
from .devices import resolve_device
from .dtypes import dtype_name
from .errors import LplrError, opt
from .experts import compress_experts
from .io.journal import Journal, resume_state
from .io.manifest import Manifest, TensorRecord, sha256_file, write_json_atomic
from .io.outdir import OutputLock
from .io.output import loaded_tensor
from .io.prefetch import prefetched, to_host
from .io.reader import SourceCheckpoint, open_source
from .io.sidefiles import copy_side_files
from .io.writer import ShardWriter
from .math.error import relative_error
from .math.sketch import derive_seed
from .math.weighted import weighted_relative_error
from .methods import InputStats, Settings, flat_defaults, get_method, make_settings
from .methods.base import layer_json, overlay
from .plan import PlanOptions, TensorPlan, build_plan_options, make_plan

__all__ = ["ConvertOptions", "convert", "plan_options"]

NONFINITE_CHOICES = ("error", "copy")
_F32_MAX = torch.finfo(torch.float32).max
DEFAULT_SHARD_BYTES = 5 * 10**9


@dataclass(frozen=True)
class ConvertOptions:
    """Every option of a conversion, validated; `command` is the command line recorded in the manifest.

    `settings` is the method and knobs for the selected weights. `defaults` (optional) is a flat layer of knobs for
    every method (see `methods.base.overlay`), which recipe rules start from; the command line passes all its knobs
    there. `max_shard_size` is in bytes. `calibration` is a STATS directory written by `calibrate` from the same
    checkpoint: methods that use it become activation-aware, and every compressed tensor's record gets its
    activation-weighted error. `target_bits_per_param` allocates each compressed tensor's rank or width under one
    global budget (`allocation.allocate_plans`).
    """

    in_path: str
    out_path: str
    settings: Settings = field(default_factory=make_settings)
    defaults: dict | None = None
    seed: int = 0
    device: str = "auto"  # resolved when the run starts; the manifest records the device used
    include: str | None = None
    exclude: str | None = None
    layers: str | None = None
    types: str | None = None
    recipe: str | None = None
    max_shard_size: int = DEFAULT_SHARD_BYTES
    calibration: str | None = None
    target_bits_per_param: float | None = None
    overwrite: bool = False
    resume: bool = False
    revision: str | None = None
    on_nonfinite: str = "error"
    command: str | None = None
    write_report: bool = True
    base_model: str | None = None  # Hub repo id the card names as base_model (default: found from the source)

    def __post_init__(self) -> None:
        if self.overwrite and self.resume:
            raise LplrError(f"{opt('overwrite')} and {opt('resume')} contradict each other; pass one of them")
        if self.on_nonfinite not in NONFINITE_CHOICES:
            raise LplrError(f"{opt('on_nonfinite')} {self.on_nonfinite!r} is unknown; use one of "
                            f"{', '.join(NONFINITE_CHOICES)}")
        if self.base_model is not None:
            from .hub import check_repo_id

            check_repo_id(self.base_model, what=opt("base_model"))
        target = self.target_bits_per_param
        if target is not None and (isinstance(target, bool) or not isinstance(target, (int, float))
                                   or not 0 < target < 64):
            raise LplrError(f"{opt('target_bits_per_param')} {target!r} must be a number of bits/param in (0, 64)")
        size = self.max_shard_size
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise LplrError(f"{opt('max_shard_size')} {size!r} must be a positive number of bytes")

    def layer(self) -> dict:
        """The flat settings layer of this run: the explicit values (`defaults`, else every knob of `settings`)."""
        if self.defaults is not None:
            return overlay(flat_defaults(), self.defaults)
        return overlay(flat_defaults(), {"method": self.settings.method, **self.settings.knobs()})


def recorded_settings(popts: PlanOptions) -> dict:
    """The run's settings as the manifest records them: the default method's full settings plus every other knob
    given explicitly (which recipe rules may use)."""
    return {**popts.settings.to_json(), **layer_json(popts.defaults)}


def plan_options(opts: ConvertOptions) -> tuple[PlanOptions, str | None]:
    """The plan options of a run and the recipe's text (recorded in the manifest)."""
    return build_plan_options(opts.layer(), opts.recipe, opts.include, opts.exclude, opts.layers, opts.types)


def _fingerprint(src: SourceCheckpoint, opts: ConvertOptions, popts: PlanOptions, recipe_text, hashes,
                 stats) -> dict:
    """Everything that decides the output's bytes: resuming with any of it changed is refused."""
    settings = recorded_settings(popts)
    return {"calibration": None if stats is None else stats.digest(),"format_version": C.FORMAT_VERSION, "tool_version": __version__, "source_files": hashes, "config": src.config, **settings,
            "seed": opts.seed, "include": opts.include, "exclude": opts.exclude, "layers": opts.layers,
            "types": opts.types, "recipe": recipe_text, "max_shard_size": opts.max_shard_size,
            "on_nonfinite": opts.on_nonfinite, "target_bits_per_param": opts.target_bits_per_param}


def _source_info(src: SourceCheckpoint, hashes: dict, base_model: str | None) -> dict:
    from .card import base_model_of

    found, where = (base_model, "given") if base_model else base_model_of(src.root, src.repo_id)
    return {"path": None if src.repo_id else str(src.root), "repo_id": src.repo_id, "revision": src.revision,
            "commit": src.commit, "model_type": src.config.get("model_type"),
            "architectures": src.config.get("architectures"), "kind": src.kind, "files": hashes,
            "base_model": found, "base_model_from": where}


def _open_stats(path: str | None, plans: list[TensorPlan], hashes: dict[str, str], src: SourceCheckpoint, device):
    """The calibration statistics of a run, checked: made from this checkpoint, one for every compressed tensor."""
    if path is None:
        return None
    from .calibration import load_calibration

    stats = load_calibration(path, device=str(device))
    stats.check_hashes(hashes, src.root)
    stats.require(p.name for p in plans if p.method != "copy" and not p.experts)
    return stats


def _stats_info(path: str | None, stats) -> dict | None:
    """What the manifest records of the calibration used."""
    if stats is None:
        return None
    m = stats.manifest
    return {"path": str(path), "manifest_sha256": stats.digest(), "text": m.get("text"), "samples": m.get("samples"),
            "tokens": m.get("tokens"), "seq_len": m.get("seq_len")}


def _hash_sources(src: SourceCheckpoint) -> dict[str, str]:
    return {f: sha256_file(src.root / f) for f in tqdm(src.files, desc="hashing source", unit="file",
                                                        disable=len(src.files) < 2)}


def _preflight(plans: list[TensorPlan], calibrated: bool) -> None:
    """Resolve every rank policy before anything is written, so a bad policy fails fast, naming the tensor."""
    for p in plans:
        if p.method != "copy":
            try:
                get_method(p.method).predict(p.oriented_shape, p.dtype, p.settings, calibrated)
            except LplrError as e:
                raise LplrError(f"{p.name}: {e.template}") from None


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in t. min and max propagate NaN and show an Inf: one reduction pass (10 ms on an 11008x4096
    fp16 matrix here, against 125 ms for isfinite(t).all())."""
    if not t.dtype.is_floating_point or t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _process(plan: TensorPlan, t: torch.Tensor, device: torch.device, global_seed: int, on_nonfinite: str,
             stats: InputStats | None = None):
    """Compress one tensor on `device`: (stored tensors by full name, MethodResult, seed, why it was copied verbatim
    instead (None when it was not), settings used). The recorded error is that of exactly what a loader returns;
    with `stats` the result's extra facts hold the output (activation-weighted) error of that tensor."""
    settings, seed, problem = plan.settings, derive_seed(global_seed, plan.name), None
    if settings.method != "copy":
        if not _all_finite(t):
            problem = _refuse_or_copy(plan, t, "contains NaN or Inf", on_nonfinite, "fix the checkpoint, or pass")
        else:
            W = t.to(device, non_blocking=True)  # the one host-to-device copy (from pinned memory on CUDA)
            result, why = _compress_checked(plan, W, seed, stats)
            if why is None:
                result.parts = to_host(result.parts, device)
            else:
                problem = _refuse_or_copy(plan, W, why, on_nonfinite, "leave it uncompressed with "
                                          f"{opt('exclude')}, or pass")
            del W
    if settings.method == "copy" or problem is not None:
        settings = make_settings("copy")
        result = get_method("copy").compress(t, settings, seed)
    stored = {(f"{plan.name}.{k}" if k else plan.name): v for k, v in result.parts.items()}
    return stored, result, seed, problem, settings


def _compress_checked(plan: TensorPlan, W: torch.Tensor, seed: int, stats: InputStats | None):
    """(MethodResult whose rel_error is the error of what a loader returns, None), or (None, why the result cannot
    be stored: a reconstruction or factor that is not finite in the source dtype, or a numerical failure)."""
    method = get_method(plan.method)
    try:
        if plan.experts:  # per-expert compression (calibration statistics cover block linears, not fused experts)
            result = compress_experts(method, W, plan.settings, seed, plan.transposed)
        else:
            result = method.compress(W.T if plan.transposed else W, plan.settings, seed, stats)
        loaded = loaded_tensor(method, result.parts, result.info, plan.transposed, plan.dtype)
        factors = _loaded_factors(method, result) if method.factored and not plan.experts else ()
    except torch.linalg.LinAlgError:
        return None, f"cannot be compressed by {method.name}: its linear algebra failed"
    except LplrError as e:
        raise LplrError(e.template if e.template.startswith(plan.name) else f"{plan.name}: {e.template}") from None
    dtype = dtype_name(plan.dtype)
    if not _all_finite(loaded):
        return None, f"decodes to values that are not finite in {dtype} after {method.name}"
    if not all(_all_finite(f.to(plan.dtype)) for f in factors):  # load_model(factored=True) builds layers of these
        return None, f"has {method.name} factors that are not finite in {dtype}"
    # Row blocks of about 2^19 entries stay in cache: 0.013 s against 0.21 s for 4096-row blocks on 2048x2048 here.
    result.rel_error = relative_error(W.flatten(0, -2), loaded.flatten(0, -2),
                                      block_rows=max(1, (1 << 19) // max(1, W.shape[-1])))
    if stats is not None:  # the output error of the same tensor, in the method's (out, in) orientation
        W_o, loaded_o = (W.T, loaded.T) if plan.transposed else (W, loaded)
        result.extra["output_rel_error"] = float(weighted_relative_error(W_o.float(), loaded_o.float(), stats.H))
    return result, None


def _loaded_factors(method, result) -> list[torch.Tensor]:
    """The factors (and the backbone of Q + L R) that load_model(factored=True) builds a layer from."""
    L, R = method.decode_factors(result.parts, result.info)
    base = method.decode_base(result.parts, result.info)
    return [L, R] + ([] if base is None else [base])


def _refuse_or_copy(plan: TensorPlan, W: torch.Tensor, why: str, on_nonfinite: str, fix: str) -> str:
    """`why` the tensor cannot be compressed as planned: an LplrError naming it (on_nonfinite error), or the reason
    recorded when it is copied verbatim instead (on_nonfinite copy)."""
    if _all_finite(W) and W.numel():
        why += f" (its largest |value| is {float(W.abs().amax()):.3g}; {dtype_name(plan.dtype)} holds up to " \
               f"{torch.finfo(plan.dtype).max:.3g}" + ("" if plan.dtype == torch.float32 else
                                                     f", the methods' float32 arithmetic {_F32_MAX:.3g}") + ")"
    if on_nonfinite == "error":
        raise LplrError(f"tensor {plan.name} {why}; {fix} {opt('on_nonfinite')} copy to keep such tensors verbatim")
    logger.warning(f"{plan.name} {why}: copied verbatim (on_nonfinite copy)")
    return why


def _record(plan: TensorPlan, settings: Settings, stored: dict[str, torch.Tensor], result, seed: int,
            seconds: float, problem: str | None) -> TensorRecord:
    method = get_method(settings.method)
    meta = {k: {"dtype": dtype_name(t.dtype), "shape": list(t.shape), "bytes": t.numel() * t.element_size()}
            for k, t in stored.items()}
    return TensorRecord.build(
        plan.name, plan.shape, dtype_name(plan.dtype), plan.dtype.itemsize, settings.to_json(), meta,
        rank_policy=settings.rank.label() if method.uses_rank else None, layer=plan.layer,
        matrix_type=plan.matrix_type, rank=result.rank, seed=seed, transposed=plan.transposed,
        reason=problem or plan.reason, rel_error=float(result.rel_error),
        output_rel_error=result.extra.pop("output_rel_error", None), seconds=round(seconds, 4),
        nonfinite=problem is not None, info=result.info,
        energy_kept=None if result.energy_kept is None else float(result.energy_kept), extra=result.extra)


def convert(opts: ConvertOptions) -> dict:
    """Convert a checkpoint; returns the manifest document. Resumable; the manifest is written last."""
    try:
        return _convert(opts)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise LplrError(f"writing {opts.out_path} failed ({os.strerror(e.errno)}); the output is left incomplete "
                            f"(no manifest): free disk space, then re-run with {opt('resume')}") from None
        raise


def _convert(opts: ConvertOptions) -> dict:
    t_start = time.perf_counter()
    device = resolve_device(opts.device)
    popts, recipe_text = plan_options(opts)
    src = open_source(opts.in_path, opts.revision)
    plans = make_plan(src.headers.values(), src.config, popts)
    _preflight(plans, opts.calibration is not None)
    out = Path(opts.out_path).expanduser()
    with OutputLock.guarding(out, src.root, overwrite=opts.overwrite, resume=opts.resume):
        n_comp = sum(p.method != "copy" for p in plans)
        logger.info(f"{src.root}: {len(plans)} tensors in {len(src.files)} file(s); {n_comp} to compress with "
                    f"{popts.settings.method if not popts.rules else 'a recipe'} on {device}")
        run = _Run(opts, src, out, plans, popts, recipe_text, device, _hash_sources(src))
        records = run.compress_all()
        manifest = run.finish(records)
        manifest.summary = _summary(manifest.tensors, time.perf_counter() - t_start)
        write_json_atomic(out / C.MANIFEST_FILE, manifest.seal().to_json())
        (out / C.PROGRESS_FILE).unlink(missing_ok=True)
    doc = manifest.to_json()
    if opts.write_report:
        _write_report(out, doc)
    return doc


class _Run:
    """One conversion under way: its journal and shard writer over the planned tensors."""

    def __init__(self, opts: ConvertOptions, src: SourceCheckpoint, out: Path, plans: list[TensorPlan],
                 popts: PlanOptions, recipe_text: str | None, device: torch.device, hashes: dict[str, str]):
        self.opts, self.src, self.out, self.plans, self.popts = opts, src, out, plans, popts
        self.recipe_text, self.device, self.hashes = recipe_text, device, hashes
        self.stats = _open_stats(opts.calibration, plans, hashes, src, device)
        self._shared: InputStats | None = None
        self.allocation = None
        if opts.target_bits_per_param is not None:
            self.plans, self.allocation = allocate_plans(
                plans, self._oriented, self._stats_for, opts.target_bits_per_param,
                frozenset(k for k in popts.defaults if k != "method"), self.stats is not None)
        self.journal = Journal(out, _fingerprint(src, opts, popts, recipe_text, hashes, self.stats))
        self.journal.shards = resume_state(out, self.journal.fingerprint) if opts.resume else []
        self.journal.save()
        self.writer = ShardWriter(out, opts.max_shard_size, on_close=self.journal.on_close)
        self.writer.closed = self.journal.closed_shards()

    def compress_all(self) -> dict[str, TensorRecord]:
        """Compress every tensor not already in a kept shard; returns every tensor's record by name."""
        records = self.journal.records()
        by_name = {p.name: p for p in self.plans}
        todo = [p.name for p in self.plans if p.name not in records]
        cuda = self.device.type == "cuda"
        try:
            with tqdm(total=len(self.plans), initial=len(records), desc="converting", unit="tensor") as bar:
                for name, t in prefetched(self.src.iter_tensors(todo, pin=cuda), enabled=cuda, pin=cuda):
                    records[name] = self._one(by_name[name], t)
                    del t
                    bar.update(1)
            self.writer.close_shard()
        except BaseException:
            self.writer.abort()
            raise
        return records

    def _oriented(self, names: list[str]):
        """(name, float tensor on the compute device in (out, in) orientation) of the named source tensors."""
        by_name = {p.name: p for p in self.plans}
        for name, t in self.src.iter_tensors(names):
            W = t.to(self.device).float()
            yield name, W.T if by_name[name].transposed else W

    def _stats_for(self, plan: TensorPlan) -> InputStats | None:
        """The input statistics of a compressed tensor (one H resident at a time; weights sharing it share its
        cache, e.g. the whitening of q/k/v's common input)."""
        if self.stats is None or plan.method == "copy" or plan.experts:
            return None
        key = self.stats.key(plan.name)
        if self._shared is None or self._shared.key != key:
            self._shared = None
            self._shared = InputStats(self.stats.statistic(plan.name).to(self.device, torch.float32), key)
        return self._shared

    def _one(self, plan: TensorPlan, t: torch.Tensor) -> TensorRecord:
        t0 = time.perf_counter()
        stored, result, seed, problem, used = _process(plan, t, self.device, self.opts.seed, self.opts.on_nonfinite,
                                                       self._stats_for(plan))
        shard_idx = self.writer.add_group(plan.name, stored)
        rec = _record(plan, used, stored, result, seed, time.perf_counter() - t0, problem)
        rec.shard = shard_idx
        self.journal.pending[plan.name] = rec
        if rec.grew:
            logger.warning(f"{plan.name}: stored form is larger than the original ({rec.bits_per_param:.2f} "
                           f"bits/param vs {rec.original_bits_per_param:.0f}); done as asked")
        return rec

    def finish(self, records: dict[str, TensorRecord]) -> Manifest:
        """Final shard names, the index and the copied side files (announced in the journal first), and the manifest
        (returned, not yet written)."""
        src, out = self.src, self.out
        side = [(p.relative_to(src.root).as_posix(), p) for p in src.side_files()]
        self.journal.announce([*self.writer.final_names(), C.SAFE_INDEX, *(rel for rel, _ in side)])
        weight_map, shard_files = self.writer.finalize()
        ordered = [records[p.name] for p in self.plans]
        for r in ordered:
            r.shard = weight_map[next(iter(r.stored))]
        total_size = sum(v["bytes"] for r in ordered for v in r.stored.values())
        write_json_atomic(out / C.SAFE_INDEX, {"metadata": {"total_size": total_size},
                                               "weight_map": dict(sorted(weight_map.items()))})
        quant = {"quant_method": C.QUANT_METHOD, "format_version": C.FORMAT_VERSION, "manifest": C.MANIFEST_FILE,
                 "method": self.popts.settings.method}
        files = copy_side_files(side, out, {**src.config, "quantization_config": quant,
                                            C.CONFIG_WEIGHTS_KEY: C.IMPORT_GUARD_FILE})
        files[C.SAFE_INDEX] = {"sha256": sha256_file(out / C.SAFE_INDEX), "bytes": (out / C.SAFE_INDEX).stat().st_size}
        return Manifest(tool_version=__version__, complete=True, source=_source_info(src, self.hashes, self.opts.base_model),
                        options=self._options(), tensors=ordered, shards=shard_files, files=files)

    def _options(self) -> dict:
        o = self.opts
        return {"command": o.command, "seed": o.seed, "device": str(self.device),
                "calibration": _stats_info(o.calibration, self.stats), "allocation": self.allocation,
                "settings": recorded_settings(self.popts), "include": o.include, "exclude": o.exclude,
                "layers": o.layers, "types": o.types, "recipe": self.recipe_text, "recipe_path": o.recipe,
                "max_shard_size": o.max_shard_size, "on_nonfinite": o.on_nonfinite}


def _summary(records: list[TensorRecord], seconds: float) -> dict:
    from .report.metrics import report_summary, tensor_rows

    return {**report_summary(tensor_rows(records)), "wall_seconds": round(seconds, 3)}


def _write_report(out: Path, manifest: dict) -> None:
    from .report import write_report

    try:
        write_report(out, manifest)
    except Exception as e:  # noqa: BLE001  # the conversion itself is complete; a report failure must not hide it
        logger.warning(f"the report could not be written ({type(e).__name__}: {e}); run `lplr-convert report`")

