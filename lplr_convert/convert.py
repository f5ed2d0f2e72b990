"""The pipeline: source reader -> plan -> method on the device -> shard writer -> index, manifest, report."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from loguru import logger
from tqdm import tqdm

from . import __version__
from . import constants as C
from .errors import LplrError
from .io.manifest import integrity_hash, sha256_file, write_json_atomic
from .io.reader import SourceCheckpoint, open_source
from .io.writer import ClosedShard, ShardWriter
from .math.sketch import derive_seed
from .methods import MethodSettings, get_method
from .methods._common import dtype_name
from .plan import PlanOptions, TensorPlan, load_recipe, make_plan, parse_layers, parse_types

__all__ = ["ConvertOptions", "convert", "inspect", "parse_size", "resolve_device", "summarize"]

NONFINITE_CHOICES = ("error", "copy")


def parse_size(size: str | int) -> int:
    """'5GB', '500MB', '2GiB', '1000' -> bytes."""
    if isinstance(size, int):
        return size
    s = str(size).strip().upper().replace(" ", "")
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "TB": 10**12, "K": 10**3, "M": 10**6, "G": 10**9, "B": 1}
    for u, mult in units.items():
        if s.endswith(u):
            num = s[: -len(u)]
            break
    else:
        num, mult = s, 1
    try:
        value = int(float(num) * mult)
    except ValueError:
        raise LplrError(f"--max-shard-size {size!r} is not a size; use e.g. 5GB, 500MB or a byte count") from None
    if value <= 0:
        raise LplrError(f"--max-shard-size {size!r} must be positive")
    return value


def resolve_device(device: str) -> torch.device:
    """'cpu', 'cuda', 'cuda:1' or 'auto' (CUDA when available) -> torch.device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise LplrError(f"--device {device!r} is not a device; use cpu, cuda or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LplrError("--device cuda was asked for but no CUDA device is available; use --device cpu or auto")
    if dev.type not in ("cpu", "cuda"):
        raise LplrError(f"--device {device!r} is not supported; use cpu, cuda or auto")
    return dev


@dataclass(frozen=True)
class ConvertOptions:
    """Every option of a conversion, validated; `command` is the command line recorded in the manifest."""

    in_path: str
    out_path: str
    settings: MethodSettings = field(default_factory=MethodSettings)
    seed: int = 0
    device: str = "cpu"
    include: str | None = None
    exclude: str | None = None
    layers: str | None = None
    types: str | None = None
    recipe: str | None = None
    max_shard_size: str | int = "5GB"
    overwrite: bool = False
    resume: bool = False
    revision: str | None = None
    on_nonfinite: str = "error"
    command: str | None = None
    write_report: bool = True

    def __post_init__(self) -> None:
        if self.overwrite and self.resume:
            raise LplrError("--overwrite and --resume contradict each other; pass one of them")
        if self.on_nonfinite not in NONFINITE_CHOICES:
            raise LplrError(f"--on-nonfinite {self.on_nonfinite!r} is unknown; use one of {', '.join(NONFINITE_CHOICES)}")


def _plan_options(opts: ConvertOptions) -> tuple[PlanOptions, str | None]:
    settings, rules, recipe_text = opts.settings, (), None
    if opts.recipe:
        settings, rules = load_recipe(opts.recipe, opts.settings)
        recipe_text = Path(opts.recipe).read_text(encoding="utf-8")
    layers = parse_layers(opts.layers)
    types = parse_types(opts.types)
    return PlanOptions(settings, opts.include, opts.exclude, tuple(layers) if layers is not None else None,
                       frozenset(types) if types is not None else None, rules), recipe_text


def _check_paths(src_root: Path, out: Path, opts: ConvertOptions) -> None:
    out_r, src_r = out.resolve(), src_root.resolve()
    if out_r == src_r or src_r in out_r.parents:
        raise LplrError(f"--out-path {out} is inside the input {src_root}; choose a directory outside the source")
    if out_r in src_r.parents:
        raise LplrError(f"--out-path {out} contains the input {src_root}; choose a separate directory")
    if out.exists() and not out.is_dir():
        raise LplrError(f"--out-path {out} exists and is not a directory; choose a directory path")
    if out.is_dir() and any(out.iterdir()):
        ours = (out / C.MANIFEST_FILE).exists() or (out / C.PROGRESS_FILE).exists()
        if opts.resume:
            return
        if not opts.overwrite:
            raise LplrError(f"--out-path {out} is not empty; pass --overwrite to replace it or --resume to continue "
                            f"an interrupted conversion")
        if not ours:
            raise LplrError(f"--out-path {out} is not empty and is not an lplr-convert output, so --overwrite will "
                            f"not delete it; choose an empty or new directory")
        shutil.rmtree(out)


def _fingerprint(src: SourceCheckpoint, opts: ConvertOptions, popts: PlanOptions, recipe_text, hashes) -> dict:
    settings = popts.settings.to_json()
    settings["rank"] = popts.settings.rank.label()
    return {"format_version": C.FORMAT_VERSION, "source_files": hashes, **settings, "seed": opts.seed,
            "include": opts.include, "exclude": opts.exclude, "layers": opts.layers, "types": opts.types, "recipe": recipe_text, "max_shard_size": parse_size(opts.max_shard_size),
            "on_nonfinite": opts.on_nonfinite}


class _Journal:
    """`lplr_progress.json`: the fingerprint of the run and every finished shard with its tensor records."""

    def __init__(self, out: Path, fingerprint: dict):
        self.path, self.fingerprint, self.shards = out / C.PROGRESS_FILE, fingerprint, []
        self.pending: dict[str, dict] = {}

    def save(self) -> None:
        write_json_atomic(self.path, {"fingerprint": self.fingerprint, "shards": self.shards}, indent=None)

    def on_close(self, shard: ClosedShard) -> None:
        records = [self.pending.pop(g) for g in shard.groups]
        self.shards.append({"index": shard.index, "temp_name": shard.temp_name, "sha256": shard.sha256,
                            "bytes": shard.nbytes, "names": shard.names, "groups": shard.groups,
                            "records": records})
        self.save()


def _resume_state(out: Path, fingerprint: dict) -> list[dict]:
    """Finished shards of an interrupted run that are intact on disk (checked by hash); the rest is discarded."""
    path = out / C.PROGRESS_FILE
    if not path.is_file():
        if (out / C.MANIFEST_FILE).exists():
            raise LplrError(f"{out} already holds a finished conversion; use --overwrite to redo it")
        return []
    try:
        journal = json.loads(path.read_text(encoding="utf-8"))
        old = journal["fingerprint"]
        shards = journal["shards"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        raise LplrError(f"{path} is damaged; start again with --overwrite") from None
    for key in sorted(set(old) | set(fingerprint)):
        if old.get(key) != fingerprint.get(key):
            what = "the source files changed" if key == "source_files" else f"--{key.replace('_', '-')} changed"
            raise LplrError(f"cannot resume in {out}: {what} since the interrupted run (was {str(old.get(key))[:80]}, "
                            f"now {str(fingerprint.get(key))[:80]}); rerun with the same settings or use --overwrite")
    kept = []
    for s in shards:
        f = out / s["temp_name"]
        if f.is_file() and f.stat().st_size == s["bytes"] and sha256_file(f) == s["sha256"]:
            kept.append(s)
        else:
            logger.warning(f"shard {s['temp_name']} is missing or damaged; redoing it and everything after it")
            break
    keep_names = {s["temp_name"] for s in kept}
    for p in out.iterdir():  # anything else we wrote is redone
        if p.name in keep_names or p.name == C.PROGRESS_FILE:
            continue
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    logger.info(f"resuming: {len(kept)} finished shard(s) kept, {sum(len(s['groups']) for s in kept)} tensors skipped")
    return kept


def _record(plan: TensorPlan, stored: dict[str, torch.Tensor], result, seed: int, seconds: float, shard_idx: int,
            nonfinite: bool) -> dict:
    shape = list(plan.shape)
    numel = max(1, math.prod(shape))
    original_bytes = math.prod(shape) * plan.dtype.itemsize
    stored_meta = {k: {"dtype": dtype_name(t.dtype), "shape": list(t.shape), "bytes": t.numel() * t.element_size()}
                   for k, t in stored.items()}
    stored_bytes = sum(v["bytes"] for v in stored_meta.values())
    s = plan.settings
    factored = get_method(s.method).factored
    rel_error = float(result.rel_error)
    return {
        "name": plan.name, "shape": shape, "dtype": dtype_name(plan.dtype), "method": s.method,
        "layer": plan.layer, "matrix_type": plan.matrix_type, "rank": result.rank,
        "b1": s.b1 if factored else None, "b2": s.b2 if factored else None,
        "b0": s.b0 if s.method == "rtn" else None,
        "quantizer": s.quantizer if s.method not in ("copy", "laser") else None,
        "group_size": s.group_size if s.method not in ("copy", "laser") else None,
        "rank_policy": s.rank.label() if get_method(s.method).uses_rank else None,
        "seed": seed, "transposed": plan.transposed, "reason": plan.reason,
        "stored": stored_meta, "shard": shard_idx, "original_bytes": original_bytes, "stored_bytes": stored_bytes,
        "bits_per_param": 8 * stored_bytes / numel, "original_bits_per_param": 8 * original_bytes / numel,
        "rel_error": rel_error,
        "energy_kept": None if result.energy_kept is None else float(result.energy_kept),
        "seconds": round(seconds, 4), "grew": stored_bytes > original_bytes, "nonfinite": nonfinite,
        "info": result.info,
    }


def summarize(records: list[dict], seconds: float | None = None) -> dict:
    """Totals over tensor records: sizes, bits/param, parameter-weighted error, slowest and grown tensors."""
    def numel(r):
        return math.prod(r["shape"])

    comp = [r for r in records if r["method"] != "copy"]
    params = sum(numel(r) for r in records)
    cparams = sum(numel(r) for r in comp)
    orig = sum(r["original_bytes"] for r in records)
    stored = sum(r["stored_bytes"] for r in records)
    cstored = sum(r["stored_bytes"] for r in comp)
    werr = sum(numel(r) * r["rel_error"] for r in comp) / cparams if cparams else 0.0
    by_method: dict[str, dict] = {}
    for r in records:
        m = by_method.setdefault(r["method"], {"tensors": 0, "params": 0, "stored_bytes": 0, "original_bytes": 0,
                                               "weighted_rel_error": 0.0})
        m["tensors"] += 1
        m["params"] += numel(r)
        m["stored_bytes"] += r["stored_bytes"]
        m["original_bytes"] += r["original_bytes"]
        m["weighted_rel_error"] += numel(r) * r["rel_error"]
    for m in by_method.values():
        m["weighted_rel_error"] /= max(m["params"], 1)
        m["bits_per_param"] = 8 * m["stored_bytes"] / max(m["params"], 1)
    slowest = sorted(((r["name"], r["seconds"]) for r in comp), key=lambda x: -x[1])[:5]
    return {"n_tensors": len(records), "n_compressed": len(comp), "params": params, "compressed_params": cparams,
            "original_bytes": orig, "stored_bytes": stored, "size_ratio": stored / orig if orig else 1.0,
            "bits_per_param": 8 * stored / params if params else 0.0,
            "compressed_bits_per_param": 8 * cstored / cparams if cparams else 0.0,
            "compressed_original_bits_per_param": 8 * sum(r["original_bytes"] for r in comp) / cparams if cparams else 0.0,
            "weighted_rel_error": werr, "by_method": by_method,
            "grown": [r["name"] for r in records if r["grew"]],
            "nonfinite_copied": [r["name"] for r in records if r.get("nonfinite")],
            "slowest": [list(s) for s in slowest], "seconds": round(seconds, 3) if seconds is not None else None}


def _copy_side_files(src: SourceCheckpoint, out: Path, settings: MethodSettings) -> dict[str, dict]:
    """Copy every non-weight file and sub-folder of the source; config.json gains quantization_config."""
    files: dict[str, dict] = {}
    for p in src.side_files():
        rel = p.relative_to(src.root)
        dst = out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if str(rel) == C.CONFIG_FILE:
            cfg = dict(src.config)
            cfg["quantization_config"] = {"quant_method": C.QUANT_METHOD, "format_version": C.FORMAT_VERSION,
                                          "manifest": C.MANIFEST_FILE, "method": settings.method}
            dst.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        else:
            shutil.copy2(p, dst)
        files[str(rel)] = {"sha256": sha256_file(dst), "bytes": dst.stat().st_size}
    return files


def _source_info(src: SourceCheckpoint, hashes: dict) -> dict:
    return {"path": None if src.repo_id else str(src.root), "repo_id": src.repo_id, "revision": src.revision,
            "commit": src.commit,
            "model_type": src.config.get("model_type"), "architectures": src.config.get("architectures"),
            "kind": src.kind, "files": hashes}


def _hash_sources(src: SourceCheckpoint) -> dict[str, str]:
    return {f: sha256_file(src.root / f) for f in tqdm(src.files, desc="hashing source", unit="file",
                                                        disable=len(src.files) < 2)}


def _oriented(plan: TensorPlan) -> tuple[int, ...]:
    return (plan.shape[1], plan.shape[0]) if plan.transposed else plan.shape


def _preflight(plans: list[TensorPlan]) -> None:
    """Resolve every rank policy before anything is written, so a bad policy fails fast, naming the tensor."""
    for p in plans:
        if p.method != "copy":
            try:
                get_method(p.method).predict(_oriented(p), p.dtype, p.settings)
            except LplrError as e:
                raise LplrError(f"{p.name}: {e}") from None


def _prefetched(items, enabled: bool, pin: bool):
    """Read the next (name, tensor) in a background thread while the current one is computed (one slot).

    Used on CUDA: the host side reads tensor i+1 into pinned memory (safetensors are read there directly; other
    tensors are pinned here) while the device works on tensor i.
    """
    if not enabled:
        yield from items
        return
    import queue
    import threading

    slot: queue.Queue = queue.Queue(maxsize=1)
    done = object()

    def work():
        try:
            for name, t in items:
                slot.put((name, t.pin_memory() if pin and not t.is_pinned() else t))
            slot.put(done)
        except BaseException as e:  # noqa: BLE001  (handed to the consumer thread)
            slot.put(e)

    threading.Thread(target=work, daemon=True).start()
    while (item := slot.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


def _to_host(parts: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Bring a result back with one device-to-host copy: all parts as one byte buffer, split on the host."""
    if device.type == "cpu":
        return {k: v.contiguous() for k, v in parts.items()}
    items = sorted(parts.items(), key=lambda kv: -kv[1].element_size())  # keeps every part aligned
    flat = [v.contiguous().reshape(-1).view(torch.uint8) for _, v in items]
    host = torch.cat(flat).to("cpu")
    out, pos = {}, 0
    for (k, v), f in zip(items, flat):
        out[k] = host[pos:pos + f.numel()].view(v.dtype).reshape(v.shape)
        pos += f.numel()
    return {k: out[k] for k in parts}


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in t. min and max propagate NaN and show an Inf: one reduction pass (10 ms on an 11008x4096
    fp16 matrix here, against 125 ms for isfinite(t).all())."""
    if not t.dtype.is_floating_point or t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _process(plan: TensorPlan, t: torch.Tensor, device: torch.device, global_seed: int, on_nonfinite: str):
    """Compress one tensor on `device`; return (stored tensors by full name, MethodResult, seed, nonfinite)."""
    settings, nonfinite = plan.settings, False
    if settings.method != "copy" and not _all_finite(t):
        if on_nonfinite == "error":
            raise LplrError(f"tensor {plan.name} contains NaN or Inf; fix the checkpoint, or pass --on-nonfinite copy "
                            f"to keep such tensors verbatim")
        logger.warning(f"{plan.name} contains NaN/Inf: copied verbatim (--on-nonfinite copy)")
        settings, nonfinite = replace(settings, method="copy"), True
    seed = derive_seed(global_seed, plan.name)
    method = get_method(settings.method)
    if settings.method == "copy":
        result = method.compress(t, settings, seed)
    else:
        W = t.to(device, non_blocking=True)  # the one host-to-device copy (from pinned memory on CUDA)
        if plan.transposed:
            W = W.T
        result = method.compress(W, settings, seed)
        result.parts = _to_host(result.parts, device)
    stored = {(f"{plan.name}.{k}" if k else plan.name): v for k, v in result.parts.items()}
    return stored, result, seed, nonfinite, settings


def convert(opts: ConvertOptions) -> dict:
    """Convert a checkpoint; returns the manifest. Resumable; the manifest is written last."""
    try:
        return _convert(opts)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise LplrError(f"writing {opts.out_path} failed ({os.strerror(e.errno)}); the output is left incomplete "
                            f"(no manifest): free disk space, then re-run with --resume") from None
        raise


def _convert(opts: ConvertOptions) -> dict:
    t_start = time.perf_counter()
    device = resolve_device(opts.device)
    popts, recipe_text = _plan_options(opts)
    max_bytes = parse_size(opts.max_shard_size)
    src = open_source(opts.in_path, opts.revision)
    out = Path(opts.out_path).expanduser()
    _check_paths(src.root, out, opts)
    plans = make_plan(src.headers.values(), src.config, popts)
    _preflight(plans)
    n_comp = sum(p.method != "copy" for p in plans)
    logger.info(f"{src.root}: {len(plans)} tensors in {len(src.files)} file(s); {n_comp} to compress with "
                f"{popts.settings.method if not popts.rules else 'a recipe'} on {device}")
    hashes = _hash_sources(src)
    fingerprint = _fingerprint(src, opts, popts, recipe_text, hashes)
    out.mkdir(parents=True, exist_ok=True)
    kept = _resume_state(out, fingerprint) if opts.resume else []
    journal = _Journal(out, fingerprint)
    journal.shards = list(kept)
    journal.save()
    writer = ShardWriter(out, max_bytes, on_close=journal.on_close)
    writer.closed = [ClosedShard(s["index"], s["temp_name"], s["sha256"], s["bytes"], s["names"], s["groups"])
                     for s in kept]
    records = {r["name"]: r for s in kept for r in s["records"]}
    by_name = {p.name: p for p in plans}
    todo = [p.name for p in plans if p.name not in records]
    try:
        with tqdm(total=len(plans), initial=len(records), desc="converting", unit="tensor") as bar:
            cuda = device.type == "cuda"
            for name, t in _prefetched(src.iter_tensors(todo, pin=cuda), enabled=cuda, pin=cuda):
                plan = by_name[name]
                t0 = time.perf_counter()
                stored, result, seed, nonfinite, used = _process(plan, t, device, opts.seed, opts.on_nonfinite)
                del t
                shard_idx = writer.add_group(name, stored)
                rec = _record(replace(plan, settings=used), stored, result, seed, time.perf_counter() - t0,
                              shard_idx, nonfinite)
                records[name] = rec
                journal.pending[name] = rec
                bar.update(1)
                if rec["grew"]:
                    logger.warning(f"{name}: stored form is larger than the original ({rec['bits_per_param']:.2f} "
                                   f"bits/param vs {rec['original_bits_per_param']:.0f}); done as asked")
        weight_map, shard_files = writer.finalize()
    except BaseException:
        writer.abort()
        raise
    ordered = [records[p.name] for p in plans]
    for r in ordered:
        r["shard"] = weight_map[next(iter(r["stored"]))]
    total_size = sum(v["bytes"] for r in ordered for v in r["stored"].values())
    write_json_atomic(out / C.SAFE_INDEX, {"metadata": {"total_size": total_size},
                                           "weight_map": dict(sorted(weight_map.items()))}, sort_keys=False)
    files = _copy_side_files(src, out, popts.settings)
    files[C.SAFE_INDEX] = {"sha256": sha256_file(out / C.SAFE_INDEX), "bytes": (out / C.SAFE_INDEX).stat().st_size}
    manifest = {
        C.M_FORMAT_VERSION: C.FORMAT_VERSION, C.M_TOOL: C.TOOL_NAME, C.M_TOOL_VERSION: __version__,
        C.M_COMPLETE: True,
        C.M_SOURCE: _source_info(src, hashes),
        C.M_OPTIONS: {"command": opts.command, "seed": opts.seed, "device": str(device),
                      "settings": popts.settings.to_json(), "include": opts.include, "exclude": opts.exclude,
                      "layers": opts.layers, "types": opts.types, "recipe": recipe_text,
                      "recipe_path": opts.recipe, "max_shard_size": max_bytes, "on_nonfinite": opts.on_nonfinite},
        C.M_TENSORS: ordered,
        C.M_SHARDS: shard_files,
        C.M_FILES: files,
        C.M_SUMMARY: summarize(ordered, time.perf_counter() - t_start),
        C.M_EVAL: None,
    }
    manifest[C.M_INTEGRITY] = integrity_hash(manifest)
    write_json_atomic(out / C.MANIFEST_FILE, manifest)
    (out / C.PROGRESS_FILE).unlink(missing_ok=True)
    if opts.write_report:
        _write_report(out, manifest)
    return manifest


def _write_report(out: Path, manifest: dict) -> None:
    try:
        from .report import write_report
    except ImportError:
        return
    try:
        write_report(out, manifest)
    except Exception as e:  # noqa: BLE001  # the conversion itself is complete; a report failure must not hide it
        logger.warning(f"the report could not be written ({type(e).__name__}: {e}); run `lplr-convert report`")


def inspect(in_path: str, options: ConvertOptions | None = None) -> dict:
    """What the checkpoint holds, what each tensor would get, and the predicted output size; computes nothing."""
    opts = options or ConvertOptions(in_path=in_path, out_path="")
    popts, _ = _plan_options(opts)
    src = open_source(in_path, opts.revision)
    plans = make_plan(src.headers.values(), src.config, popts)
    rows, predicted, exact = [], 0, True
    header_bytes = 0
    for p in plans:
        method = get_method(p.method)
        shape = _oriented(p)
        if p.method == "copy":
            rank, specs = None, {"": (dtype_name(p.dtype), p.shape)}
        else:
            rank, specs = method.predict(shape, p.dtype, p.settings)
        if not specs:
            exact = False
        nbytes = 0
        for suffix, (dt, shp) in specs.items():
            nbytes += math.prod(shp) * getattr(torch, dt).itemsize
            header_bytes += 90 + len(p.name) + len(suffix) + 8 * len(shp)
        predicted += nbytes
        orig = math.prod(p.shape) * p.dtype.itemsize
        rows.append({"name": p.name, "shape": list(p.shape), "dtype": dtype_name(p.dtype), "method": p.method,
                     "layer": p.layer, "matrix_type": p.matrix_type, "rank": rank, "reason": p.reason,
                     "original_bytes": orig, "predicted_bytes": nbytes if specs else None,
                     "grows": bool(specs) and nbytes > orig})
    side = sum(f.stat().st_size for f in src.side_files())
    orig_total = sum(r["original_bytes"] for r in rows)
    return {"source": str(src.root), "kind": src.kind, "files": src.files, "model_type": src.config.get("model_type"),
            "tensors": rows, "original_bytes": orig_total, "predicted_tensor_bytes": predicted,
            "predicted_output_bytes": predicted + header_bytes + side, "exact": exact,
            "n_compressed": sum(r["method"] != "copy" for r in rows)}
