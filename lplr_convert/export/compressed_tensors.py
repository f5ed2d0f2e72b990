"""`export --format compressed-tensors`: a checkpoint in compressed-tensors' `pack-quantized` format, which
transformers (with the `compressed-tensors` package) and vLLM load natively, without lplr-convert.

Every integer-quantized full-size matrix of an nn.Linear (rtn, gptq, qlr's backbone Q) whose spec fits
(`common.pack_reason`) is written losslessly: the stored codes, scales and zero points are the same numbers in
compressed-tensors' layout (`math.quantize`'s docstring gives the mapping; checked against compressed-tensors
0.20.1):
- `weight_packed`: int32 (out, ceil(in * bits / 32)), each row's unsigned codes c little end first
  (`math.bitpack.pack_rows_int32`; compressed-tensors' value q = c - 2**(bits-1));
- `weight_scale`: the stored scales in their stored dtype, (out, 1) channel, (out, in / group_size) group, (1,)
  tensor;
- `weight_zero_point` (asymmetric): the zero points zp, packed like the codes but along the output dim, int32
  (ceil(out * bits / 32), groups) for channel/group; int8 zp - 2**(bits-1) of shape (1,) for tensor;
- `weight_shape`: int64 (out, in).
compressed-tensors decodes (q - z) * s, which is our (c - zp) * s; the only difference is the precision it is computed
in (the scale's dtype, or the model's dtype once the scale is loaded into the model's parameter), so decoded weights
are bit-identical where that dtype holds the product (float32 models) and within one rounding to it otherwise.

config.json's `quantization_config`: one config group (one (bits, symmetric, strategy, group_size): see
`common._one_scheme`) targeting "Linear"; `ignore` lists every other nn.Linear of the model (vLLM needs a scheme or an
ignore entry for each). Everything else is written dense in the source dtype.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from .. import constants as C
from ..errors import LplrError, opt
from ..io.outdir import output_path
from ..io.output import ConvertedOutput
from ..io.sidefiles import copy_side_files
from ..io.writer import DEFAULT_SHARD_BYTES, ShardWriter
from ..math import quantize as qz
from ..math.bitpack import pack_rows_int32
from .common import (
    EXPORT_RETRY,
    ExportPlan,
    ExportResult,
    Placement,
    base_tensor,
    exporting,
    finish_shards,
    plain_config,
    plan_export,
    register_format,
    scheme_of,
    side_files_of,
    write_record,
)

__all__ = ["export_compressed_tensors", "pack_quantized", "quantization_config"]

VLLM_BITS = (4, 8)  # vLLM's WNA16 kernels (pack-quantized, 16-bit activations); recent releases: 2-8 symmetric


def pack_quantized(q: qz.Quantized) -> dict[str, torch.Tensor]:
    """The pack-quantized tensors of one quantized matrix (keys: weight_packed, weight_scale, weight_shape and, for
    asymmetric, weight_zero_point). Exact: the same codes, scales and zero points, in compressed-tensors' layout."""
    spec = q.spec
    tensor = spec.granularity == "tensor"
    out = {C.CT_PACKED: pack_rows_int32(q.codes, spec.bits),
           C.CT_SCALE: (q.scale.reshape(1) if tensor else q.scale).contiguous(),
           C.CT_SHAPE: torch.tensor(spec.shape, dtype=torch.int64)}
    if spec.scheme == "asymmetric":
        zp = q.zero_point
        out[C.CT_ZERO_POINT] = (zp.reshape(1).to(torch.int16) - (1 << (spec.bits - 1))).to(torch.int8) if tensor \
            else pack_rows_int32(zp.T.contiguous(), spec.bits).T.contiguous()
    return out


def _weights(key: tuple) -> dict:
    bits, symmetric, strategy, group_size = key
    return {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": strategy, "group_size": group_size,
            "dynamic": False}


def quantization_config(plan: ExportPlan) -> tuple[dict, list[tuple]]:
    """config.json's quantization_config for the packed placements of `plan` (one scheme: `common._one_scheme`), and
    that scheme in a list."""
    schemes = list(dict.fromkeys(scheme_of(p.spec) for p in plan.placements if p.spec is not None))
    packed = {p.module for p in plan.placements if p.spec is not None}
    config_groups = {f"group_{i}": {"targets": ["Linear"], "weights": _weights(key)} for i, key in enumerate(schemes)}
    return {"quant_method": C.CT_QUANT_METHOD, "format": C.CT_FORMAT, "quantization_status": C.CT_STATUS,
            "config_groups": config_groups, "ignore": [m for m in plan.linear_modules if m not in packed],
            "kv_cache_scheme": None}, schemes


def _notes(schemes: list[tuple], plan: ExportPlan) -> list[str]:
    """What the user must know to load and serve the export (facts of transformers 5.24, compressed-tensors 0.20.1
    and vLLM's compressed-tensors integration)."""
    notes = []
    if any(not sym and strategy != "tensor" for _, sym, strategy, _ in schemes):
        notes.append("asymmetric channel/group weights: load with transformers' quantization_config="
                     "CompressedTensorsConfig(dequantize=True) (transformers 5.24 + compressed-tensors 0.20.1 build "
                     "an unpacked weight_zero_point otherwise and report a size mismatch)")
    if any(bits not in VLLM_BITS for bits, *_ in schemes):
        notes.append("widths other than 4 and 8 bits load with compressed-tensors >= 0.18 (its dense packing); vLLM's "
                     "pack-quantized kernels take 4 and 8 bits (recent releases 2-8 bits, symmetric)")
    if any(strategy == "tensor" for _, _, strategy, _ in schemes):
        notes.append("tensor-wide scales: transformers loads them, vLLM's pack-quantized scheme takes group or "
                     "channel scales only")
    if any(not sym and bits not in VLLM_BITS for bits, sym, *_ in schemes):
        notes.append("vLLM takes zero points (asymmetric) at 4 and 8 bits only")
    if plan.weight_readers and any(sym or strategy == "tensor" for _, sym, strategy, _ in schemes):
        notes.append(f"{plan.weight_readers} reads the weight of packed linears when transformers initialises it, "
                     f"which the default compressed-tensors path removes (AttributeError: no attribute 'weight'): "
                     f"load with CompressedTensorsConfig(dequantize=True)")
    if not schemes:
        notes.append("nothing here fits compressed-tensors' packed format: this is a plain dense checkpoint (no "
                     "quantization_config) holding the qlr backbones Q, the base of the peft export")
    corrections = sum(p.adapter for p in plan.placements)
    if corrections:
        notes.append(f"{corrections} qlr low-rank corrections are not in this base (it holds their backbones Q): "
                     f"`lplr-convert export --format peft` writes them as a LoRA adapter to apply over it")
    return notes


def _tensors(output: ConvertedOutput, p: Placement) -> dict[str, torch.Tensor]:
    parts = output.parts(p.rec)
    if p.spec is None:
        return {p.rec.name: base_tensor(output, p, parts)}
    q = p.layout.backbone.quantized(parts)
    stem = p.rec.name.removesuffix(".weight")
    return {f"{stem}.{k}": t for k, t in pack_quantized(q).items()}


def _write(output: ConvertedOutput, plan: ExportPlan, out: Path, max_shard_size: int,
           qconfig: dict | None) -> list[str]:
    writer = ShardWriter(out, max_shard_size, retry=EXPORT_RETRY)
    total = 0
    for p in tqdm(plan.placements, desc="exporting", unit="tensor"):
        tensors = _tensors(output, p)
        writer.add_group(p.rec.name, tensors)
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    files = finish_shards(writer, out, total)
    config = plain_config(output)
    if config is None:
        raise LplrError(f"{output.root} has no config.json; a compressed-tensors export needs one for its "
                        f"quantization_config")
    if qconfig is not None:  # else a plain checkpoint: the base of a qlr adapter with nothing packable
        config["quantization_config"] = qconfig
    return files + list(copy_side_files(side_files_of(output), out, config))


def export_compressed_tensors(in_path: str | Path, out_path: str | Path, max_shard_size: int = DEFAULT_SHARD_BYTES,
                              overwrite: bool = False) -> ExportResult:
    """Write the conversion in `in_path` as a compressed-tensors `pack-quantized` checkpoint in `out_path` (see the
    module docstring). With `overwrite`, only an earlier export in `out_path` is replaced."""
    out = output_path(out_path)
    with ConvertedOutput(in_path) as output:
        plan = plan_export(output)
        packed = any(p.spec is not None for p in plan.placements)
        if not packed and not any(p.adapter for p in plan.placements):
            reasons = sorted({p.reason for p in plan.placements if p.rec.method != "copy"}) or ["nothing compressed"]
            raise LplrError(f"{in_path} holds no weight compressed-tensors can store packed ({reasons[0]}); convert "
                            f"with a {opt('method')} whose layout has an integer-quantized full-size matrix and "
                            f"{opt('scheme')} symmetric/asymmetric, or use `decompress`")
        qconfig, schemes = quantization_config(plan) if packed else (None, [])
        with exporting(output.root, out, overwrite, [rel for rel, _ in side_files_of(output)]):
            files = _write(output, plan, out, max_shard_size, qconfig)
            result = ExportResult(out, C.CT_QUANT_METHOD, str(output.root), files=files,
                                  packed=[p.rec.name for p in plan.placements if p.spec is not None],
                                  dense=[(p.rec.name, p.reason) for p in plan.placements if p.spec is None],
                                  notes=_notes(schemes, plan))
            write_record(result)
    return result



@register_format(C.CT_QUANT_METHOD)
def _export(in_path, out_path, *, base_model=None, max_shard_size=DEFAULT_SHARD_BYTES, overwrite=False):
    if base_model is not None:
        raise LplrError(f"{opt('base_model')} names the base of a peft adapter; drop it for {opt('format')} "
                        f"{C.CT_QUANT_METHOD}")
    return export_compressed_tensors(in_path, out_path, max_shard_size, overwrite)
