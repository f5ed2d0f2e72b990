"""Writing converted outputs in other formats: a plain dense checkpoint (`decompress`), a compressed-tensors
`pack-quantized` checkpoint and a PEFT LoRA adapter (`export`)."""

from __future__ import annotations

from pathlib import Path

from .common import ExportResult, export_formats, get_format, register_format
from .compressed_tensors import DEFAULT_SHARD_BYTES, export_compressed_tensors
from .dense import decompress
from .peft import export_peft

__all__ = ["ExportResult", "decompress", "export", "export_compressed_tensors", "export_formats", "export_peft",
           "get_format", "register_format"]


def export(in_path: str | Path, out_path: str | Path, format: str, base_model: str | None = None,
           max_shard_size: int = DEFAULT_SHARD_BYTES, overwrite: bool = False) -> ExportResult:
    """Export the conversion in `in_path` to `out_path` as `format`, a registered export format (`register_format`:
    "compressed-tensors", "peft"; see `export_compressed_tensors` and `export_peft`). `base_model` (peft only) becomes
    the adapter's base_model_name_or_path; `max_shard_size` (bytes) bounds compressed-tensors shards."""
    return get_format(format)(in_path, out_path, base_model=base_model, max_shard_size=max_shard_size,
                              overwrite=overwrite)
