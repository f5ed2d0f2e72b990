"""`decompress`: a plain Hugging Face checkpoint (original names, shapes, dtypes) that any tool loads directly."""

from __future__ import annotations

import json
from pathlib import Path

from loguru import logger
from tqdm import tqdm

from .. import constants as C
from ..io.output import ConvertedOutput
from ..io.sidefiles import copy_side_files
from ..io.writer import DEFAULT_SHARD_BYTES, ShardWriter
from .common import finish_shards, locked_output, plain_config, side_files_of

__all__ = ["decompress", "side_files_of"]



def _previous_checkpoint(side: list[tuple[str, Path]]):
    """A function listing what an earlier decompress of this output wrote in a directory: its shards and index, and
    the side files (None when it holds no checkpoint)."""

    def listed(out: Path) -> set[str] | None:
        if not (out / C.SAFE_INDEX).is_file() and not (out / C.SAFE_SINGLE).is_file():
            return None
        files = {rel for rel, _ in side} | {C.SAFE_INDEX, C.SAFE_SINGLE}
        try:
            files |= {str(f) for f in json.loads((out / C.SAFE_INDEX).read_text(encoding="utf-8"))["weight_map"]
                      .values()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
        return files

    return listed


def decompress(path: str | Path, out_path: str | Path, max_shard_size: int = DEFAULT_SHARD_BYTES,
               overwrite: bool = False) -> Path:
    """Write a plain Hugging Face checkpoint (original names, shapes, dtypes) that transformers loads directly.

    `max_shard_size` is in bytes. With `overwrite`, only an earlier decompress of the same output is replaced.
    """
    out = Path(out_path).expanduser()
    with ConvertedOutput(path) as output:
        side = side_files_of(output)
        with locked_output(output.root, out, overwrite, _previous_checkpoint(side), "decompress"):
            _write(output, out, max_shard_size, side)
    logger.info(f"wrote a plain checkpoint to {out}")
    return out


def _write(output: ConvertedOutput, out: Path, max_shard_size: int, side) -> None:
    writer = ShardWriter(out, max_shard_size)
    for name, W in tqdm(output.iter_dense(), total=len(output.records), desc="decompressing", unit="tensor"):
        writer.add_group(name, {name: W})
    finish_shards(writer, out, sum(r.original_bytes for r in output.records))
    copy_side_files(side, out, plain_config(output))
