"""Copying the files that travel with the weights (tokenizer, configs, sub-folders), shared by convert and
decompress: each copied verbatim except config.json, which is written from the config the caller gives."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .. import constants as C
from .manifest import sha256_file

__all__ = ["copy_side_files", "write_config"]


def write_config(path: Path, config: dict) -> None:
    """config.json as transformers writes it (indent 2, trailing newline)."""
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def copy_side_files(files: list[tuple[str, Path]], out: Path, config: dict | None) -> dict[str, dict]:
    """Copy (relative name, source path) pairs into `out`; config.json becomes `config` when it is given.
    Returns {relative name: {"sha256", "bytes"}} of what was written."""
    written: dict[str, dict] = {}
    for rel, src in files:
        dst = out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if rel == C.CONFIG_FILE and config is not None:
            write_config(dst, config)
        else:
            shutil.copy2(src, dst)
        written[rel] = {"sha256": sha256_file(dst), "bytes": dst.stat().st_size}
    return written
