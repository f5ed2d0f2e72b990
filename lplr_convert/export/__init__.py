"""Writing converted outputs in other formats: a plain dense checkpoint (`decompress`), a compressed-tensors
`pack-quantized` checkpoint and a PEFT LoRA adapter (`export`)."""

from __future__ import annotations

from pathlib import Path

from .. import constants as C
from ..errors import LplrError, opt
from .common import ExportResult
from .compressed_tensors import DEFAULT_SHARD_BYTES, export_compressed_tensors
from .dense import decompress
from .peft import export_peft

__all__ = ["ExportResult", "decompress", "export", "export_compressed_tensors", "export_peft"]


def export(in_path: str | Path, out_path: str | Path, format: str, base_model: str | None = None,
           max_shard_size: int = DEFAULT_SHARD_BYTES, overwrite: bool = False) -> ExportResult:
    """Export the conversion in `in_path` to `out_path` as `format` ("compressed-tensors" or "peft"; see
    `export_compressed_tensors` and `export_peft`). `base_model` (peft only) becomes the adapter's
    base_model_name_or_path; `max_shard_size` (bytes) bounds compressed-tensors shards."""
    if format == C.CT_QUANT_METHOD:
        if base_model is not None:
            raise LplrError(f"{opt('base_model')} names the base of a peft adapter; drop it for {opt('format')} {format}")
        return export_compressed_tensors(in_path, out_path, max_shard_size, overwrite)
    if format == C.PEFT_EXPORT:
        return export_peft(in_path, out_path, base_model, overwrite)
    raise LplrError(f"export format {format!r} is unknown; use one of {', '.join(C.EXPORT_FORMATS)}")
