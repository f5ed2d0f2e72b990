"""One tensor's work, wherever it runs: read it by name, compress it on a device, build its record (and spectrum),
and pack the stored tensors into one byte buffer for a pipe or an object store."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from loguru import logger

from ..dtypes import dtype_from_name, dtype_name
from ..errors import LplrError, opt
from ..io.manifest import TensorRecord
from ..io.output import decoded_factors, loaded_blocks
from ..io.prefetch import to_host
from ..io.reader import SourceCheckpoint
from ..io.writer import tensor_bytes
from ..math.error import blocked_errors
from ..math.sketch import derive_seed
from ..methods import InputStats, Settings, get_method, make_settings
from ..report.spectra import tensor_spectrum
from .experts import compress_experts
from .plan import TensorPlan

_F32_MAX = torch.finfo(torch.float32).max

__all__ = ["JobResult", "TensorJob", "pack_result", "read_tensor", "run_job", "unpack_result"]


@dataclass(frozen=True)
class TensorJob:
    """What to do with one tensor: its plan, the run's global seed and NaN policy, and its spectra mode ("off" for
    every tensor the report does not plot)."""

    plan: TensorPlan
    seed: int
    on_nonfinite: str
    spectrum: str = "off"

    @property
    def name(self) -> str:
        return self.plan.name


@dataclass
class JobResult:
    """The stored tensors of one weight (full names, on the host) and its record."""

    name: str
    stored: dict[str, torch.Tensor]
    record: TensorRecord


def read_tensor(src: SourceCheckpoint, name: str, pin: bool = False) -> torch.Tensor:
    """One tensor of the source, read by its byte range (safetensors) with only its file open meanwhile."""
    it = src.iter_tensors([name], pin=pin)
    try:
        return next(it)[1]
    finally:
        it.close()


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in t. min and max propagate NaN and show an Inf: one reduction pass (10 ms on an 11008x4096
    fp16 matrix here, against 125 ms for isfinite(t).all())."""
    if not t.dtype.is_floating_point or t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _process(job: TensorJob, t: torch.Tensor, device: torch.device, stats: InputStats | None = None):
    """Compress one tensor on `device`: (stored tensors by full name, MethodResult, seed, why it was copied verbatim
    instead (None when it was not), settings used, spectrum record or None). The recorded error is that of exactly
    what a loader returns; with `stats` the result's extra facts hold the output (activation-weighted) error of that
    tensor."""
    plan, on_nonfinite = job.plan, job.on_nonfinite
    settings, seed, problem, spectrum = plan.settings, derive_seed(job.seed, plan.name), None, None
    if settings.method != "copy":
        if not _all_finite(t):
            problem = _refuse_or_copy(plan, t, "contains NaN or Inf", on_nonfinite, "fix the checkpoint, or pass")
        else:
            W = t.to(device, non_blocking=True)  # the one host-to-device copy (from pinned memory on CUDA)
            result, why = _compress_checked(plan, W, seed, stats)
            if why is None:
                if not plan.experts:  # while W is on the device
                    spectrum = tensor_spectrum(job.spectrum, W.T if plan.transposed else W, result.spectrum)
                result.parts = to_host(result.parts, device)
            else:
                problem = _refuse_or_copy(plan, W, why, on_nonfinite, "leave it uncompressed with "
                                          f"{opt('exclude')}, or pass")
            del W
    if settings.method == "copy" or problem is not None:
        settings = make_settings("copy")
        result = get_method("copy").compress(t, settings, seed)
    stored = {(f"{plan.name}.{k}" if k else plan.name): v for k, v in result.parts.items()}
    return stored, result, seed, problem, settings, spectrum


def _compress_checked(plan: TensorPlan, W: torch.Tensor, seed: int, stats: InputStats | None):
    """(MethodResult whose rel_error is the error of what a loader returns, None), or (None, why the result cannot
    be stored: a reconstruction or factor that is not finite in the source dtype, or a numerical failure)."""
    method = get_method(plan.method)
    try:
        if plan.experts:  # per-expert compression (calibration statistics cover block linears, not fused experts)
            result = compress_experts(method, W, plan.settings, seed, plan.transposed)
        else:
            result = method.compress(W.T if plan.transposed else W, plan.settings, seed, stats)
        result.error_fn = None  # measured below, on what a loader returns (its own estimate would be wasted work)
        factors = decoded_factors(method, result.parts, result.info) if method.factored and not plan.experts \
            else None
        # The output error (with stats) in the method's (out, in) orientation, which `loaded_blocks` yields.
        rel, out_rel, finite = blocked_errors(
            loaded_blocks(method, result.parts, result.info, W, plan.transposed, plan.dtype, factors),
            None if stats is None else stats.H)
    except torch.linalg.LinAlgError:
        return None, f"cannot be compressed by {method.name}: its linear algebra failed"
    except LplrError as e:
        raise LplrError(e.template if e.template.startswith(plan.name) else f"{plan.name}: {e.template}") from None
    dtype = dtype_name(plan.dtype)
    if not finite:
        return None, f"decodes to values that are not finite in {dtype} after {method.name}"
    # load_model(factored=True) builds layers of these
    if factors is not None and not all(_all_finite(f.to(plan.dtype)) for f in factors if f is not None):
        return None, f"has {method.name} factors that are not finite in {dtype}"
    result.rel_error = rel
    if out_rel is not None:
        result.extra["output_rel_error"] = float(out_rel)
    return result, None


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
            seconds: float, problem: str | None, spectrum: dict | None) -> TensorRecord:
    method = get_method(settings.method)
    meta = {k: {"dtype": dtype_name(t.dtype), "shape": list(t.shape), "bytes": t.numel() * t.element_size()}
            for k, t in stored.items()}
    return TensorRecord.build(
        plan.name, plan.shape, dtype_name(plan.dtype), plan.dtype.itemsize, settings.to_json(), meta,
        rank_policy=settings.rank.label() if method.uses_rank else None, layer=plan.layer,
        matrix_type=plan.matrix_type, rank=result.rank, seed=seed, transposed=plan.transposed,
        reason=problem or plan.reason, rel_error=result.error(),
        output_rel_error=result.extra.pop("output_rel_error", None), seconds=round(seconds, 4),
        nonfinite=problem is not None, info=result.info,
        energy_kept=None if result.energy_kept is None else float(result.energy_kept), extra=result.extra,
        spectrum=spectrum)


def run_job(job: TensorJob, t: torch.Tensor, device: torch.device, stats: InputStats | None = None) -> JobResult:
    """Compress tensor `t` (on the host) as `job` says, on `device` (against calibration `stats`, in-process only);
    its record's `seconds` is the time this took."""
    t0 = time.perf_counter()
    stored, result, seed, problem, used, spectrum = _process(job, t, device, stats)
    rec = _record(job.plan, used, stored, result, seed, time.perf_counter() - t0, problem, spectrum)
    return JobResult(job.name, stored, rec)


def pack_result(res: JobResult) -> tuple[dict, bytearray]:
    """A result as a picklable header and one byte buffer holding every stored tensor (for a pipe or Ray)."""
    parts, total = [], 0
    for key, t in res.stored.items():
        n = t.numel() * t.element_size()
        total += -total % 8  # every part starts 8-byte aligned, so that it can be viewed as its dtype
        parts.append((key, dtype_name(t.dtype), list(t.shape), total, n))
        total += n
    buf = bytearray(total)
    view = memoryview(buf)
    for (key, _, _, start, n), t in zip(parts, res.stored.values()):
        view[start:start + n] = tensor_bytes(t)
    return {"name": res.name, "record": res.record.to_json(), "parts": parts, "nbytes": total}, buf


def unpack_result(header: dict, buf) -> JobResult:
    """Inverse of `pack_result`; the tensors are views of `buf` (a writable buffer)."""
    flat = torch.frombuffer(buf, dtype=torch.uint8) if header["nbytes"] else torch.empty(0, dtype=torch.uint8)
    stored = {}
    for key, dtype, shape, start, n in header["parts"]:
        stored[key] = flat[start:start + n].view(dtype_from_name(dtype)).reshape(shape)
    return JobResult(header["name"], stored, TensorRecord.from_json(header["record"]))
