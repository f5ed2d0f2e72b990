"""Reading and writing `lplr_manifest.json`, the record of a conversion (schema in README, keys in constants)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .. import constants as C
from ..errors import IncompleteOutputError, LplrError

__all__ = ["integrity_hash", "is_complete", "read_manifest", "sha256_file", "write_json_atomic"]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def integrity_hash(manifest: dict) -> str:
    """sha256 over the parts of a manifest the loader trusts: the tensor records and the shard hashes."""
    payload = {C.M_TENSORS: manifest.get(C.M_TENSORS), C.M_SHARDS: manifest.get(C.M_SHARDS)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_json_atomic(path: str | os.PathLike, obj, indent: int | None = 2, sort_keys: bool = False) -> None:
    """Write JSON under a temporary name, fsync, then rename over `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + C.PARTIAL_SUFFIX)
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, sort_keys=sort_keys)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def is_complete(out_dir: str | os.PathLike) -> bool:
    """True when `out_dir` holds a manifest that marks a finished conversion."""
    try:
        read_manifest(out_dir)
        return True
    except LplrError:
        return False


def read_manifest(out_dir: str | os.PathLike, require_complete: bool = True) -> dict:
    """Load the manifest of a converted directory.

    Raises IncompleteOutputError for a directory without a complete manifest (an interrupted conversion), and
    LplrError for anything that is not a conversion output at all.
    """
    out_dir = Path(out_dir)
    path = out_dir / C.MANIFEST_FILE
    if not out_dir.is_dir():
        raise LplrError(f"{out_dir} is not a directory; pass the output directory of an lplr-convert run")
    if not path.is_file():
        if (out_dir / C.PROGRESS_FILE).exists():
            raise IncompleteOutputError(f"{out_dir} holds an interrupted conversion (no {C.MANIFEST_FILE}); "
                                        f"finish it with `lplr-convert convert ... --resume`")
        raise LplrError(f"{out_dir} has no {C.MANIFEST_FILE}; it is not an lplr-convert output directory "
                        f"(convert a checkpoint first with `lplr-convert --in-path SRC --out-path {out_dir}`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LplrError(f"{path} is unreadable or not valid JSON ({e}); re-run the conversion with --overwrite") from None
    if not isinstance(manifest, dict) or manifest.get(C.M_FORMAT_VERSION) is None:
        raise LplrError(f"{path} is not an lplr-convert manifest; re-run the conversion with --overwrite")
    major = str(manifest[C.M_FORMAT_VERSION]).split(".")[0]
    if major != C.FORMAT_VERSION.split(".")[0]:
        raise LplrError(f"{path} has format version {manifest[C.M_FORMAT_VERSION]}, this tool reads "
                        f"{C.FORMAT_VERSION}; upgrade lplr-convert or re-convert")
    if require_complete and manifest.get(C.M_COMPLETE) is not True:
        raise IncompleteOutputError(f"{out_dir} holds an incomplete conversion; finish it with "
                                    f"`lplr-convert convert ... --resume`")
    if manifest.get(C.M_INTEGRITY) != integrity_hash(manifest):
        raise LplrError(f"{path} was modified after the conversion (its integrity hash does not match); "
                        f"re-run the conversion with --overwrite")
    return manifest
