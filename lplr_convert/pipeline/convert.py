"""The pipeline: source reader -> plan -> method on the device -> shard writer -> index, manifest, report.

Orchestration only: the pieces live in `io/` (reader, writer, journal, output-directory policy, side files,
manifest), `pipeline/plan.py` and `methods/`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from pathlib import Path

import torch
from loguru import logger
from tqdm import tqdm

from .. import __version__
from .. import constants as C
from ..devices import resolve_device
from ..dtypes import dtype_name
from ..errors import LplrError, opt
from ..io.journal import Journal, resume_state
from ..io.manifest import Manifest, TensorRecord, sha256_file, write_json_atomic
from ..io.outdir import OutputLock, output_path, prepare_output, resumable_when_full
from ..io.reader import SourceCheckpoint, open_source
from ..io.sidefiles import copy_side_files
from ..io.writer import ShardWriter, write_index
from ..methods import InputStats, get_method
from ..methods._common import BACKBONES
from ..methods.base import layer_json
from ..report.metrics import summary_of
from ..report.spectra import representative_tensors
from .allocation import allocate_plans
from .options import ConvertOptions, fingerprint_options, recorded_options
from .plan import PlanOptions, TensorPlan, build_plan_options, make_plan
from .task import JobResult, TensorJob

__all__ = ["ConvertOptions", "StatsFor", "allocated", "convert", "hash_sources", "open_stats", "plan_options"]


def recorded_settings(popts: PlanOptions) -> dict:
    """The run's settings as the manifest records them: the default method's full settings plus every other knob
    given explicitly (which recipe rules may use)."""
    return {**popts.settings.to_json(), **layer_json(popts.defaults)}


def plan_options(opts: ConvertOptions) -> tuple[PlanOptions, str | None]:
    """The plan options of a run and the recipe's text (recorded in the manifest)."""
    return build_plan_options(opts.layer, opts.recipe, opts.include, opts.exclude, opts.layers, opts.types)


def _fingerprint(src: SourceCheckpoint, popts: PlanOptions, hashes, options: dict, run: dict) -> dict:
    """Everything that decides the output's bytes: resuming with any of it changed is refused. `options`: the run
    options declared to decide them, at their effective values (`options.fingerprint_options`: the devices resolved,
    the threads a default resolved to); `run`: what the run made of them (the executor, the devices' automatic
    arithmetic, the global allocation's choices)."""
    return {"format_version": C.FORMAT_VERSION, "tool_version": __version__, "source_files": hashes,
            "config": src.config, **recorded_settings(popts), **options, **run}


def _arithmetic(devices: list[str], ray: bool) -> dict | None:
    """Per compute device, the automatic choices of arithmetic that change a result's bits: the sketch product in
    bfloat16 (`math.sketch.native_bfloat16`, lplr's sketch_precision auto) and the exact int8 Gram products
    (`math.lstsq.integer_matmul`). None on a Ray cluster, whose nodes this process cannot probe."""
    if ray:
        return None
    from ..math.lstsq import integer_matmul
    from ..math.sketch import native_bfloat16

    return {d: {"native_bfloat16": native_bfloat16(d), "integer_matmul": integer_matmul(d)} for d in devices}


def _allocated(allocation: dict | None) -> dict | None:
    """The global allocation's choice of each tensor (its knob changes; not the estimated errors, whose last bits
    follow this process's threads)."""
    if allocation is None:
        return None
    return {name: {k: v for k, v in c.items() if k != "estimated_error"} for name, c in allocation["choices"].items()}


def _source_info(src: SourceCheckpoint, hashes: dict, base_model: str | None) -> dict:
    from ..publish.card import base_model_of

    found, where = (base_model, "given") if base_model else base_model_of(src.root, src.repo_id)
    return {"path": None if src.repo_id else str(src.root), "repo_id": src.repo_id, "revision": src.revision,
            "commit": src.commit, "model_type": src.config.get("model_type"),
            "architectures": src.config.get("architectures"), "kind": src.kind, "files": hashes,
            "base_model": found, "base_model_from": where}


def open_stats(path: str | None, plans: list[TensorPlan], hashes: dict[str, str], src: SourceCheckpoint, device):
    """The calibration statistics of a run, checked: made from this checkpoint, one for every compressed tensor."""
    if path is None:
        return None
    from ..calibration import load_calibration
    from ..calibration.coverage import warn_thin_statistics

    stats = load_calibration(path, device=str(device))
    stats.check_hashes(hashes, src.root)
    used = [p for p in plans if p.method != "copy" and not p.experts]
    stats.require(p.name for p in used)
    shapes = stats.shapes()  # every width checked before any work (a wrong one failed mid-run)
    for p in used:
        n = p.oriented_shape[-1]
        got = shapes.get(stats.key(p.name))
        if got != (n, n):
            raise LplrError(f"the calibration statistic of {p.name} in {path} is {list(got) if got else 'missing'}, "
                            f"but its input is {n} wide (needs [{n}, {n}]); the statistics belong to another model: "
                            f"re-run `lplr-convert calibrate` on this checkpoint")
    warn_thin_statistics(stats.statistics, str(path), {stats.key(p.name) for p in used})
    return stats


def _stats_info(path: str | None, stats) -> dict | None:
    """What the manifest records of the calibration used."""
    if stats is None:
        return None
    m = stats.manifest
    return {"path": str(path), "manifest_sha256": stats.digest(), "text": m.get("text"), "samples": m.get("samples"),
            "tokens": m.get("tokens"), "seq_len": m.get("seq_len")}


def hash_sources(src: SourceCheckpoint) -> dict[str, str]:
    return {f: sha256_file(src.root / f) for f in tqdm(src.files, desc="hashing source", unit="file",
                                                        disable=len(src.files) < 2)}


class StatsFor:
    """The input statistics of a compressed tensor (None without calibration), one H resident at a time: weights
    sharing it share its cache (e.g. the whitening of q/k/v's common input)."""

    def __init__(self, stats, device):
        self.stats, self.device, self._shared = stats, device, None

    def __call__(self, plan: TensorPlan) -> InputStats | None:
        if self.stats is None or plan.method == "copy" or plan.experts:
            return None
        key = self.stats.key(plan.name)
        if self._shared is None or self._shared.key != key:
            self._shared = None
            self._shared = InputStats(self.stats.statistic(plan.name).to(self.device, torch.float32), key)
        return self._shared


def _oriented(src: SourceCheckpoint, plans: list[TensorPlan], device):
    """tensors(names): (name, float tensor on `device` in (out, in) orientation) of the named source tensors."""
    by_name = {p.name: p for p in plans}

    def tensors(names: list[str]):
        for name, t in src.iter_tensors(names):
            W = t.to(device).float()
            yield name, W.T if by_name[name].transposed else W

    return tensors


def allocated(opts: ConvertOptions, popts: PlanOptions, src: SourceCheckpoint, plans: list[TensorPlan], device,
              stats_for: StatsFor) -> tuple[list[TensorPlan], dict | None]:
    """The plans with a global budget's choices (`allocation.allocate_plans`, reading every compressed tensor once)
    and the allocation's summary; the plans as they are without `target_bits_per_param`. `convert` and `inspect`
    both plan through here."""
    if opts.target_bits_per_param is None:
        return plans, None
    # With --threads, in as many threads as the conversion: the same low bits, so that what the first pass computes
    # can be reused by it (`methods._common.BACKBONES`), and the same allocation whatever --workers.
    with _torch_threads(opts.threads):
        return allocate_plans(plans, _oriented(src, plans, device), stats_for, opts.target_bits_per_param,
                              frozenset(k for k in popts.defaults if k != "method"), stats_for.stats is not None,
                              seed=opts.seed, objective=opts.budget_objective, stats=stats_for.stats)


def _preflight(plans: list[TensorPlan], calibrated: bool) -> None:
    """Resolve every rank policy before anything is written, so a bad policy fails fast, naming the tensor."""
    for p in plans:
        if p.method != "copy":
            try:
                get_method(p.method).predict(p.oriented_shape, p.dtype, p.settings, calibrated)
            except LplrError as e:
                raise LplrError(f"{p.name}: {e.template}") from None


def convert(opts: ConvertOptions) -> dict:
    """Convert a checkpoint; returns the manifest document. Resumable; the manifest is written last."""
    with resumable_when_full(opts.out_path, "manifest"):
        return _convert(opts)


def _devices(opts: ConvertOptions) -> list[str]:
    """The compute devices, checked against this machine; for a Ray cluster only their names are checked (its nodes,
    not this machine, must have them)."""
    out = []
    for d in opts.device_list():
        if opts.ray_address:
            try:
                out.append(d if d == "auto" else str(torch.device(d)))
            except RuntimeError:
                raise LplrError(f"{opt('devices')} {d!r} is not a device; use cpu, cuda, cuda:N or auto") from None
            continue
        try:
            out.append(str(resolve_device(d)))
        except LplrError as e:
            if opts.devices is None:
                raise
            raise LplrError(f"{opt('devices')}: {e.template}") from None
    return out


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _convert(opts: ConvertOptions) -> dict:
    t_start = time.perf_counter()
    if opts.write_report:
        from ..report.plots import preload

        preload()  # matplotlib's import overlaps the conversion instead of adding to the report
    devices = _devices(opts)
    popts, recipe_text = plan_options(opts)
    src = open_source(opts.in_path, opts.revision)
    plans = make_plan(src.headers.values(), src.config, popts)
    _preflight(plans, opts.calibration is not None)
    out = output_path(opts.out_path)
    prepare = functools.partial(prepare_output, src.root, out, overwrite=opts.overwrite, resume=opts.resume)
    with OutputLock.guarding(out, src.root, prepare):
        run = _Run(opts, src, out, plans, popts, recipe_text, devices, hash_sources(src))
        n_comp = sum(p.method != "copy" for p in run.plans)
        logger.info(f"{src.root}: {len(plans)} tensors in {len(src.files)} file(s); {n_comp} to compress with "
                    f"{popts.settings.method if not popts.rules else 'a recipe'} on {run.where()}")
        records = run.compress_all()
        manifest = run.finish(records)
        summary = summary_of(manifest.tensors)  # the one computation: manifest, report and terminal show it
        manifest.summary = {**summary, "wall_seconds": round(time.perf_counter() - t_start, 3)}
        write_json_atomic(out / C.MANIFEST_FILE, manifest.seal().to_json())
        (out / C.PROGRESS_FILE).unlink(missing_ok=True)
        doc = manifest.to_json()
        if opts.write_report:  # still under the lock: no other run may start in `out` before the report is written
            _write_report(out, doc, summary)
    return doc


def _plan_rows(plans: list[TensorPlan]) -> list[dict]:
    """The fields of report rows that choosing the plotted tensors needs, known before anything is computed."""
    return [{"name": p.name, "method": p.method, "shape": list(p.shape), "layer": p.layer,
             "matrix_type": p.matrix_type} for p in plans]


@contextlib.contextmanager
def _torch_threads(threads: int | None):
    """torch uses `threads` threads meanwhile (unchanged when None)."""
    saved = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


class _Run:
    """One conversion under way: its journal and shard writer over the planned tensors, and the executor that computes
    them (in this process, a local worker pool, or Ray). This is the one writer, whichever executor computes."""

    def __init__(self, opts: ConvertOptions, src: SourceCheckpoint, out: Path, plans: list[TensorPlan],
                 popts: PlanOptions, recipe_text: str | None, devices: list[str], hashes: dict[str, str]):
        self.opts, self.src, self.out, self.plans, self.popts = opts, src, out, plans, popts
        self.recipe_text, self.devices, self.hashes = recipe_text, devices, hashes
        self.device = resolve_device(devices[0])  # this process's device (allocation, calibration statistics)
        self.workers = opts.worker_count()
        self.executor_kind = "ray" if opts.ray_address else "local pool" if self.workers > 1 else "in-process"
        self.threads = self._threads()
        self.stats = open_stats(opts.calibration, plans, hashes, src, self.device)
        if self.stats is not None and self.executor_kind != "in-process":
            raise LplrError(f"{opt('calibration')} runs in this process (one statistic resident at a time); drop "
                            f"{opt('workers')}/{opt('devices')}/{opt('ray_address')} for a calibrated conversion")
        self._stats_for = StatsFor(self.stats, self.device)
        self.plans, self.allocation = allocated(opts, popts, src, plans, self.device, self._stats_for)
        plotted = [] if opts.spectra == "off" else representative_tensors(_plan_rows(self.plans))
        self.spectra = dict.fromkeys(plotted, opts.spectra)
        run = {"executor": self.executor_kind, "arithmetic": _arithmetic(devices, bool(opts.ray_address)),
               "allocation": _allocated(self.allocation)}
        self.journal = Journal(out, _fingerprint(src, popts, hashes, fingerprint_options(opts, self._effective(True)),
                                                 run))
        self.journal.shards = resume_state(out, self.journal.fingerprint, self._expected()) if opts.resume else []
        self.journal.save()
        self.writer = ShardWriter(out, opts.max_shard_size, on_close=self.journal.on_close)
        self.writer.closed = self.journal.closed_shards()

    def _expected(self) -> dict[str, dict]:
        """What a journal's record of each planned tensor must say (JSON values): see `io.journal.resume_state`."""
        return {p.name: {"shape": list(p.shape), "dtype": dtype_name(p.dtype), "method": p.method,
                         "settings": json.loads(json.dumps(p.settings.to_json())), "transposed": p.transposed}
                for p in self.plans}

    def _threads(self) -> int:
        """torch threads per tensor computation. On the CPU the low bits of a result depend on it (LAPACK and torch's
        reductions split their work by thread), so a run is byte-identical to another with the same value."""
        if self.opts.threads is not None:
            return self.opts.threads
        if self.executor_kind == "ray":
            return 1
        if self.executor_kind == "local pool":
            return max(1, _cores() // self.workers)
        return torch.get_num_threads()

    def where(self) -> str:
        devices = ",".join(self.devices)
        if self.executor_kind == "in-process":
            return devices
        return f"{devices} ({self.executor_kind}, {self.workers} workers x {self.threads} threads)"

    def _executor(self):
        o = self.opts
        if self.executor_kind == "ray":
            from .executors.cluster import RayExecutor

            return RayExecutor(self.src, o.ray_address, self.devices, self.threads, o.retries, o.workers)
        if self.executor_kind == "local pool":
            from .executors.pool import LocalPool

            return LocalPool(self.src, self.devices, self.workers, self.threads,
                             os.environ.get("LOGURU_LEVEL", "INFO"))
        from .executors.inprocess import InProcess

        return InProcess(self.src, self.device, o.threads, self._stats_for)

    def compress_all(self) -> dict[str, TensorRecord]:
        """Compress every tensor not already in a kept shard; returns every tensor's record by name."""
        records = self.journal.records()
        o = self.opts
        jobs = [TensorJob(p, o.seed, o.on_nonfinite, self.spectra.get(p.name, "off")) for p in self.plans
                if p.name not in records]
        try:
            with tqdm(total=len(self.plans), initial=len(records), desc="converting", unit="tensor") as bar, \
                    self._executor() as executor:
                results = executor.run(jobs)
                try:
                    for res in results:
                        records[res.name] = self._write(res)
                        bar.update(1)
                finally:
                    results.close()
            self.writer.close_shard()
        except BaseException:
            self.writer.abort()
            raise
        finally:
            BACKBONES.clear()  # a budget's backbones the conversion did not take
        return records

    def _write(self, res: JobResult) -> TensorRecord:
        rec = res.record
        rec.shard = self.writer.add_group(res.name, res.stored)
        self.journal.pending[res.name] = rec
        if rec.output_rel_error is not None and self.stats is not None:  # calibrated
            from ..calibration.coverage import worse_than_uncalibrated

            worse_than_uncalibrated(res.name, rec.method, rec.rel_error, self.stats.tokens(res.name),
                                    self.stats.statistics[self.stats.key(res.name)]["shape"][-1])
        if rec.grew:
            logger.warning(f"{res.name}: stored form is larger than the original ({rec.bits_per_param:.2f} "
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
        write_index(out, weight_map, total_size)
        quant = {"quant_method": C.QUANT_METHOD, "format_version": C.FORMAT_VERSION, "manifest": C.MANIFEST_FILE,
                 "method": self.popts.settings.method}
        files = copy_side_files(side, out, {**src.config, "quantization_config": quant,
                                            C.CONFIG_WEIGHTS_KEY: C.IMPORT_GUARD_FILE})
        files[C.SAFE_INDEX] = {"sha256": sha256_file(out / C.SAFE_INDEX), "bytes": (out / C.SAFE_INDEX).stat().st_size}
        return Manifest(tool_version=__version__, complete=True, source=_source_info(src, self.hashes, self.opts.base_model),
                        options=self._options(), tensors=ordered, shards=shard_files, files=files)

    def _effective(self, fingerprint: bool = False) -> dict:
        """The run options' effective values where they differ from the given ones (resolved devices, the threads a
        default resolved to, the recipe's text and the calibration's digest (fingerprint) or description
        (manifest))."""
        calibration = (None if self.stats is None else self.stats.digest()) if fingerprint else \
            _stats_info(self.opts.calibration, self.stats)
        return {"device": self.devices[0], "devices": self.devices, "workers": self.workers, "threads": self.threads,
                "calibration": calibration, **({"recipe": self.recipe_text} if fingerprint else {})}

    def _options(self) -> dict:
        """The manifest's `options`: the recorded run options and what the run made of them."""
        return {**recorded_options(self.opts, self._effective()), "executor": self.executor_kind,
                "allocation": self.allocation, "settings": recorded_settings(self.popts), "recipe": self.recipe_text}


def _write_report(out: Path, manifest: dict, summary: dict) -> None:
    from ..report import write_report

    try:  # the curves come from the records; the source is never read again for them (see ConvertOptions.spectra)
        write_report(out, manifest, read_source=False, summary=summary)
    except KeyboardInterrupt:  # the conversion is complete: nothing to resume, only the report to write again
        raise KeyboardInterrupt(f"interrupted while writing the report; the conversion in {out} is complete (no "
                                f"--resume needed): write the report with `lplr-convert report --in-path {out}`") \
            from None
    except Exception as e:  # noqa: BLE001  # the conversion itself is complete; a report failure must not hide it
        logger.warning(f"the report could not be written ({type(e).__name__}: {e}); run `lplr-convert report`")

