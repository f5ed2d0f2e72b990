"""`decompress`: a plain Hugging Face checkpoint (original names, shapes, dtypes) that any tool loads directly."""

from __future__ import annotations

import json
from pathlib import Path

from loguru import logger
from tqdm import tqdm

from .. import constants as C
from ..errors import LplrError, opt
from ..io.manifest import write_json_atomic
from ..io.outdir import OutputLock, check_paths, clear_listed, entries
from ..io.output import ConvertedOutput
from ..io.sidefiles import copy_side_files
from ..io.writer import ShardWriter

__all__ = ["decompress", "side_files_of"]

DEFAULT_SHARD_BYTES = 5 * 10**9


def side_files_of(output: ConvertedOutput) -> list[tuple[str, Path]]:
    """The files the conversion copied from its source (config.json, tokenizer, ...): the manifest's files minus
    the index."""
    return [(rel, output.root / rel) for rel in sorted(output.manifest.files) if rel != C.SAFE_INDEX]


def _previous_checkpoint(out: Path, side: list[tuple[str, Path]]) -> set[str]:
    """What an earlier decompress of this output wrote in `out`: its shards and index, and the side files."""
    listed = {rel for rel, _ in side} | {C.SAFE_INDEX, C.SAFE_SINGLE}
    index = out / C.SAFE_INDEX
    if index.is_file():
        try:
            listed |= {str(f) for f in json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
    return listed


def _prepare(out: Path, root: Path, side, overwrite: bool) -> None:
    check_paths(root, out)
    if not out.is_dir() or not entries(out):
        return
    if not overwrite:
        raise LplrError(f"{opt('out_path')} {out} is not empty; pass {opt('overwrite')} or choose an empty directory")
    if out.is_symlink():
        raise LplrError(f"{opt('out_path')} {out} is a symbolic link; {opt('overwrite')} does not delete through "
                        f"links, pass the real directory {out.resolve()}")
    if not (out / C.SAFE_INDEX).is_file() and not (out / C.SAFE_SINGLE).is_file():
        raise LplrError(f"{opt('out_path')} {out} is not empty and holds no checkpoint, so {opt('overwrite')} will "
                        f"not delete it; choose an empty directory")
    clear_listed(out, _previous_checkpoint(out, side), "an earlier decompress of this output")


def decompress(path: str | Path, out_path: str | Path, max_shard_size: int = DEFAULT_SHARD_BYTES,
               overwrite: bool = False) -> Path:
    """Write a plain Hugging Face checkpoint (original names, shapes, dtypes) that transformers loads directly.

    `max_shard_size` is in bytes. With `overwrite`, only an earlier decompress of the same output is replaced.
    """
    out = Path(out_path).expanduser()
    with ConvertedOutput(path) as output:
        side = side_files_of(output)
        check_paths(output.root, out)
        with OutputLock(out) as lock:
            try:
                _prepare(out, output.root, side, overwrite)
            except LplrError:
                lock.discard()
                raise
            _write(output, out, max_shard_size, side)
    logger.info(f"wrote a plain checkpoint to {out}")
    return out


def _write(output: ConvertedOutput, out: Path, max_shard_size: int, side) -> None:
    writer = ShardWriter(out, max_shard_size)
    for name, W in tqdm(output.iter_dense(), total=len(output.records), desc="decompressing", unit="tensor"):
        writer.add_group(name, {name: W})
    weight_map, _ = writer.finalize()
    if len(writer.closed) == 1:
        (out / next(iter(set(weight_map.values())))).rename(out / C.SAFE_SINGLE)
    else:
        total = sum(r.original_bytes for r in output.records)
        write_json_atomic(out / C.SAFE_INDEX, {"metadata": {"total_size": total},
                                               "weight_map": dict(sorted(weight_map.items()))})
    config = None
    if (output.root / C.CONFIG_FILE).is_file():
        config = json.loads((output.root / C.CONFIG_FILE).read_text(encoding="utf-8"))
        config.pop("quantization_config", None)
        config.pop(C.CONFIG_WEIGHTS_KEY, None)
    copy_side_files(side, out, config)
