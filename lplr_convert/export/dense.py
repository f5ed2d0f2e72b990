"""`decompress`: a plain Hugging Face checkpoint (original names, shapes, dtypes) that any tool loads directly."""

from __future__ import annotations

from pathlib import Path

from loguru import logger
from tqdm import tqdm

from .. import constants as C
from ..io.outdir import output_path
from ..io.output import ConvertedOutput
from ..io.sidefiles import copy_side_files
from ..io.writer import DEFAULT_SHARD_BYTES, ShardWriter
from .common import EXPORT_RETRY, ExportResult, exporting, finish_shards, plain_config, side_files_of, write_record

__all__ = ["decompress", "side_files_of"]



def decompress(path: str | Path, out_path: str | Path, max_shard_size: int = DEFAULT_SHARD_BYTES,
               overwrite: bool = False) -> Path:
    """Write a plain Hugging Face checkpoint (original names, shapes, dtypes) that transformers loads directly.

    `max_shard_size` is in bytes. The files written are recorded in `lplr_export.json` (written last); with
    `overwrite`, only an earlier decompress or export whose record lists every file in `out_path` is replaced.
    """
    out = output_path(out_path)
    with ConvertedOutput(path) as output:
        side = side_files_of(output)
        with exporting(output.root, out, overwrite, [rel for rel, _ in side]):
            files = _write(output, out, max_shard_size, side)
            write_record(ExportResult(out, C.DENSE_EXPORT, str(output.root), files=files))
    logger.info(f"wrote a plain checkpoint to {out}")
    return out


def _write(output: ConvertedOutput, out: Path, max_shard_size: int, side) -> list[str]:
    writer = ShardWriter(out, max_shard_size, retry=EXPORT_RETRY)
    for name, W in tqdm(output.iter_dense(), total=len(output.records), desc="decompressing", unit="tensor"):
        writer.add_group(name, {name: W})
    files = finish_shards(writer, out, sum(r.original_bytes for r in output.records))
    return files + list(copy_side_files(side, out, plain_config(output)))
