"""Report rows and aggregates computed from a manifest's tensor records (pure: dicts in, dicts out)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping

from ..errors import LplrError
from ..io.manifest import Manifest, TensorRecord
from ..math.quantize import QuantSpec, stored_bits
from ..methods import Settings, get_method

__all__ = [
    "FLAG_ABOVE_INT8",
    "FLAG_GREW",
    "FLAG_NONFINITE",
    "MATRIX_TYPE_ORDER",
    "aggregate",
    "group_rows",
    "int8_bits_per_param",
    "is_causal",
    "records_of",
    "report_summary",
    "ruin_verdict",
    "settings_of",
    "summary_of",
    "tensor_rows",
    "type_sort_key",
]

MATRIX_TYPE_ORDER = ("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_up", "fc_out")
FLAG_GREW = "grew"  # stored larger than the source tensor (bits/param above the source dtype's)
FLAG_ABOVE_INT8 = "above_int8"  # more bits/param than this tool's own 8-bit per-channel RTN of the same matrix
FLAG_NONFINITE = "nonfinite"  # NaN/inf in the source, or no finite compressed form: the tensor was copied
_MB = 1e6
# Measured (artifacts/quality/decoder/NOTES.md). SmolLM2-135M, output / weight error of the block linears against its
# perplexity ratio: qlr 4.25 0.042 / 0.134 (1.19x), gptq 4-bit 0.054 / 0.165 (1.46x), calibrated lsvd 8/8 rf 0.8
# 0.064 / 0.226 (3.4x), rtn 4-bit g128 0.092 / 0.104 (1.61x), gptq 3-bit 0.116 / 0.335 (8.7x), gptq 2-bit asym+mse
# 0.185 / 0.493 (1,620x), the published lplr 8/8 rf 0.8 0.268 / 0.297 (27,500x). all-MiniLM-L6-v2 (cosine):
# gptq asym+mse 2.25 output 0.166 (0.82), calibrated lsvd 2.25 0.194 (0.70), gptq sym 2.25 0.261 (0.38); weight error
# rtn 3.25 0.231 (0.84), lplr 8/8 rf 0.8 0.259 (0.77), lplr 4/4 0.44-0.77 (< 0.45). Known miss: a min-max grid's
# float zero (rtn 4-bit per channel, published grid: weight error 0.149, cosine 0.29) shows in the output error only.
# The whole of SmolLM2 at rtn 4-bit g128 has output error 0.109 for 1.42x, so the decoder threshold sits above it:
# gptq 3-bit (0.116 on three layers, 8.7x) is a known miss there, which `eval` catches.
RUIN_OUTPUT_CAUSAL, RUIN_WEIGHT_CAUSAL = 0.15, 0.25
RUIN_OUTPUT_ENCODER, RUIN_WEIGHT_ENCODER = 0.18, 0.25


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def int8_bits_per_param(shape: list[int], transposed: bool = False) -> float | None:
    """Bits/param of an 8-bit per-output-channel min-max RTN of a 2-D weight (codes plus float32 scale and zero)."""
    if len(shape) != 2:
        return None
    m, n = (shape[1], shape[0]) if transposed else (shape[0], shape[1])
    return stored_bits(QuantSpec((m, n), 8, "channel", 0)) / (m * n)


def settings_of(rec: TensorRecord) -> Settings | None:
    """The typed settings of a record (None when its method is not registered in this process)."""
    try:
        return get_method(rec.method).settings_cls.from_json(rec.settings)
    except (LplrError, TypeError, KeyError, ValueError):
        return None


def records_of(source: Manifest | Mapping | Iterable[TensorRecord]) -> list[TensorRecord]:
    """The tensor records of a manifest (typed or its JSON document), or the records themselves."""
    if isinstance(source, Manifest):
        return source.tensors
    if isinstance(source, Mapping):
        return Manifest.from_json(source).tensors
    return list(source)


def _per_expert(rec: TensorRecord) -> list[TensorRecord]:
    """A fused-experts record as one record per expert ("name[e]"), sizes and errors its own; others as they are."""
    experts = rec.extra.get("experts") if isinstance(rec.extra, dict) else None
    if not experts:
        return [rec]
    out, n = [], len(experts)
    for e, facts in enumerate(experts):
        own = {k: v for k, v in rec.stored.items() if k == f"{rec.name}.{e}" or k.startswith(f"{rec.name}.{e}.")}
        stored = sum(v["bytes"] for v in own.values())
        params = max(_numel(rec.shape[1:]), 1)
        out.append(dataclasses.replace(
            rec, name=f"{rec.name}[{e}]", shape=list(rec.shape[1:]), stored=own, stored_bytes=stored,
            original_bytes=rec.original_bytes // n, bits_per_param=8 * stored / params, rank=facts.get("rank"),
            rel_error=facts.get("rel_error"), energy_kept=facts.get("energy_kept"), seconds=rec.seconds / n,
            grew=stored > rec.original_bytes // n,
            extra={**{k: v for k, v in rec.extra.items() if k != "experts"},
                   **{k: v for k, v in facts.items() if k not in ("rank", "rel_error", "energy_kept")}}))
    return out


def tensor_rows(source: Manifest | Mapping | Iterable[TensorRecord]) -> list[dict]:
    """One flat, JSON-able row per tensor record (per expert for fused experts, named "name[e]"), with derived
    sizes and flags, and the method's knobs (one key each, as the method declares them)."""
    rows = []
    for rec in (one for whole in records_of(source) for one in _per_expert(whole)):
        shape = [int(d) for d in rec.shape]
        params = max(_numel(shape), 1)
        int8 = int8_bits_per_param(shape, rec.transposed) if rec.method != "copy" else None
        bits = float(rec.bits_per_param) if rec.bits_per_param else 8 * rec.stored_bytes / params
        flags = [FLAG_GREW] if rec.grew or rec.stored_bytes > rec.original_bytes else []
        if int8 is not None and bits > int8 + 1e-9:
            flags.append(FLAG_ABOVE_INT8)
        if rec.nonfinite:
            flags.append(FLAG_NONFINITE)
        settings = settings_of(rec)
        label = rec.method if rec.method == "copy" or settings is None else settings.label()
        rows.append({
            "name": rec.name, "layer": rec.layer, "matrix_type": rec.matrix_type, "shape": shape, "dtype": rec.dtype,
            "method": rec.method, "label": label, "rank": rec.rank,
            "max_rank": min(shape) if len(shape) == 2 and rec.method != "copy" else None,
            **{k: v for k, v in rec.settings.items() if k not in ("method", "rank")},
            "rank_policy": rec.rank_policy, "params": params,
            "source_bits_per_param": float(rec.original_bits_per_param or 8 * rec.original_bytes / params),
            "bits_per_param": bits, "int8_bits_per_param": int8, "original_mb": rec.original_bytes / _MB,
            "stored_mb": rec.stored_bytes / _MB, "original_bytes": rec.original_bytes,
            "stored_bytes": rec.stored_bytes,
            "size_ratio": rec.stored_bytes / rec.original_bytes if rec.original_bytes else None,
            "rel_error": None if rec.rel_error is None else float(rec.rel_error),
            "output_rel_error": None if rec.output_rel_error is None else float(rec.output_rel_error),
            "energy_kept": None if rec.energy_kept is None else float(rec.energy_kept),
            "seconds": float(rec.seconds or 0.0), "flags": flags, **rec.extra,
        })
    return rows


def _weighted_mean(rows: list[dict], key: str) -> tuple[float | None, float | None]:
    """(parameter-weighted mean, max) of a finite per-row value, or (None, None) when no row has it."""
    have = [r for r in rows if r.get(key) is not None and math.isfinite(r[key])]
    params = sum(r["params"] for r in have)
    if not params:
        return None, None
    return sum(r["params"] * r[key] for r in have) / params, max(r[key] for r in have)


def aggregate(rows: list[dict]) -> dict:
    """Totals of a group of rows: tensors, params, bytes, bits/param, size ratio, parameter-weighted errors (the
    weight's Frobenius error, and with calibration the output error)."""
    params = sum(r["params"] for r in rows)
    orig = sum(r["original_bytes"] for r in rows)
    stored = sum(r["stored_bytes"] for r in rows)
    out_mean, out_max = _weighted_mean(rows, "output_rel_error")
    with_err = [r for r in rows if r["rel_error"] is not None and math.isfinite(r["rel_error"])]
    err_params = sum(r["params"] for r in with_err)
    return {
        "output_rel_error": out_mean, "max_output_rel_error": out_max,
        "tensors": len(rows), "params": params, "original_bytes": orig, "stored_bytes": stored,
        "bits_per_param": 8 * stored / params if params else None,
        "source_bits_per_param": 8 * orig / params if params else None,
        "size_ratio": stored / orig if orig else None,
        "weighted_rel_error": sum(r["params"] * r["rel_error"] for r in with_err) / err_params if err_params else None,
        "max_rel_error": max((r["rel_error"] for r in with_err), default=None),
        "grew": sum(FLAG_GREW in r["flags"] for r in rows),
        "above_int8": sum(FLAG_ABOVE_INT8 in r["flags"] for r in rows),
        "seconds": sum(r["seconds"] for r in rows),
    }


def type_sort_key(matrix_type: str | None) -> tuple[int, str]:
    if matrix_type in MATRIX_TYPE_ORDER:
        return MATRIX_TYPE_ORDER.index(matrix_type), ""
    return len(MATRIX_TYPE_ORDER), matrix_type or "~"


def group_rows(rows: list[dict], key: Callable[[dict], object]) -> dict:
    """Rows grouped by `key`, keeping first-seen order."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    return groups


def report_summary(rows: list[dict], n_slowest: int = 5) -> dict:
    """Whole-model summary: totals, compressed-only totals, per method and per matrix type, flagged tensors."""
    compressed = [r for r in rows if r["method"] != "copy"]
    total, comp = aggregate(rows), aggregate(compressed)
    methods = group_rows(sorted(rows, key=lambda r: r["method"] == "copy"), lambda r: r["method"])
    by_method = {m: aggregate(g) for m, g in methods.items()}
    by_type = {t: aggregate(g) for t, g in sorted(group_rows(compressed, lambda r: r["matrix_type"]).items(),
                                                   key=lambda kv: type_sort_key(kv[0]))}
    return {
        "n_tensors": total["tensors"], "n_compressed": comp["tensors"], "n_copied": total["tensors"] - comp["tensors"],
        "params": total["params"], "compressed_params": comp["params"],
        "original_bytes": total["original_bytes"], "stored_bytes": total["stored_bytes"],
        "size_ratio": total["size_ratio"], "bits_per_param": total["bits_per_param"],
        "source_bits_per_param": total["source_bits_per_param"],
        "compressed_bits_per_param": comp["bits_per_param"],
        "compressed_source_bits_per_param": comp["source_bits_per_param"],
        "weighted_rel_error": comp["weighted_rel_error"], "max_rel_error": comp["max_rel_error"],
        "output_rel_error": comp["output_rel_error"], "max_output_rel_error": comp["max_output_rel_error"],
        "seconds": total["seconds"],
        "methods": sorted({r["label"] for r in compressed}),
        "by_method": by_method, "by_matrix_type": {str(k): v for k, v in by_type.items()},
        "grown": [r["name"] for r in rows if FLAG_GREW in r["flags"]],
        "above_int8": [r["name"] for r in rows if FLAG_ABOVE_INT8 in r["flags"]],
        "nonfinite": [r["name"] for r in rows if FLAG_NONFINITE in r["flags"]],
        "methods_above_source": [m for m, a in by_method.items() if m != "copy" and a["bits_per_param"] is not None
                                 and a["bits_per_param"] > a["source_bits_per_param"] + 1e-9],
        "slowest": [[r["name"], r["seconds"]] for r in sorted(compressed, key=lambda r: -r["seconds"])[:n_slowest]],
    }


# What predicts a ruined model (artifacts/quality/decoder/NOTES.md): the parameter-weighted relative errors of the
# compressed tensors, the output error sqrt(tr(D H D^T) / tr(W H W^T)) where calibration statistics exist (it sees the
# offsets a float zero point adds, which the weight error misses), else the weight error. Decoder LLMs are far less
# forgiving than sentence encoders: (output error, weight error) thresholds per kind.
RUIN_THRESHOLDS = {"causal_lm": (RUIN_OUTPUT_CAUSAL, RUIN_WEIGHT_CAUSAL), "encoder": (RUIN_OUTPUT_ENCODER,
                                                                                       RUIN_WEIGHT_ENCODER)}
BETTER_BUDGET = 4.25  # qlr at 4.25 bits/param: 1.19x the float perplexity on SmolLM2-135M, cosine 0.990 on MiniLM


def is_causal(source: Mapping | None) -> bool:
    """A manifest's source is a causal LM (*ForCausalLM / *LMHeadModel), as `evaluate.model_kind` decides."""
    archs = (source or {}).get("architectures") or []
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def ruin_verdict(summary: Mapping, causal: bool, calibrated: bool = False, method: str | None = None,
                 target: float | None = None) -> dict | None:
    """None, or why the compressed tensors' errors predict a ruined model and what would do better: {"measure",
    "value", "threshold", "advice"}. `calibrated`: the conversion had calibration statistics; `method`/`target`: its
    method and budget, to name the better one."""
    out_t, w_t = RUIN_THRESHOLDS["causal_lm" if causal else "encoder"]
    out_err, w_err = summary.get("output_rel_error"), summary.get("weighted_rel_error")
    if out_err is not None:
        measure, value, threshold = "output error", out_err, out_t
    elif w_err is not None:
        measure, value, threshold = "weight error", w_err, w_t
    else:
        return None
    if not value > threshold:
        return None
    budget = f"--target-bits-per-param {BETTER_BUDGET:g}"
    if method == "qlr" and calibrated and target is not None and target < BETTER_BUDGET:
        advice = f"raise the budget ({budget})"
    elif calibrated:
        advice = f"convert with --method qlr {budget} and the same --calibration"
    else:
        advice = f"calibrate (lplr-convert calibrate --in-path SRC --out-path STATS), then convert with --method qlr " \
                 f"--calibration STATS {budget}"
    return {"measure": measure, "value": value, "threshold": threshold, "advice": advice,
            "kind": "decoder LLM" if causal else "encoder"}


def summary_of(manifest: Manifest | Mapping) -> dict:
    """The summary of a conversion from its tensor records: the same function that filled the manifest's summary
    when it was written (recomputed here because the integrity hash covers the records, not the summary)."""
    return report_summary(tensor_rows(manifest))

