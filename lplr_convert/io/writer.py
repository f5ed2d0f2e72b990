"""Byte-bounded safetensors shards written in a stream.

Tensors are appended to a data file as they arrive; when a shard fills, its header and data are written to a
`.partial` file that is fsynced and renamed, so a shard on disk is either complete or clearly partial. Final names
(`model-0000i-of-0000N.safetensors`) are given in `finalize`, when N is known.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import constants as C
from ..dtypes import ST_CODES
from ..errors import LplrError, opt
from .manifest import write_json_atomic

__all__ = ["DEFAULT_SHARD_BYTES", "ClosedShard", "ShardWriter", "serialize_header", "tensor_bytes", "write_index",
           "write_tensors_atomic"]

DEFAULT_SHARD_BYTES = 5 * 10**9  # the largest output shard unless told otherwise (the Hub's advice: <= 20 GB)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """Raw little-endian bytes of a CPU tensor (any dtype)."""
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def serialize_header(entries: list[tuple[str, str, list[int], int, int]], metadata: dict[str, str]) -> bytes:
    """The 8-byte length plus JSON header of a safetensors file, padded with spaces to 8-byte alignment."""
    header: dict = {"__metadata__": metadata}
    for name, dtype, shape, start, end in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def write_tensors_atomic(path: Path, tensors: list[tuple[str, torch.Tensor]], metadata: dict[str, str]) -> dict:
    """Write `tensors` (name, tensor; any device) as the safetensors file `path`: under a `.partial` name, fsynced,
    renamed. Each tensor's bytes go to the file from its own memory (a device tensor is copied to the CPU one at a
    time), hashed on the way: no second copy of the whole set, no second read. Returns {"sha256", "bytes"}."""
    entries, start = [], 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        entries.append((name, ST_CODES[t.dtype], list(t.shape), start, start + nbytes))
        start += nbytes
    tmp = path.with_name(path.name + C.PARTIAL_SUFFIX)
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as f:
            for buf in itertools.chain([memoryview(serialize_header(entries, metadata))],
                                       (tensor_bytes(t) for _, t in tensors)):  # lazily: one tensor at a time
                f.write(buf)
                digest.update(buf)
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        tmp.unlink(missing_ok=True)  # e.g. a full disk: give the space back at once
        raise
    os.replace(tmp, path)
    return {"sha256": digest.hexdigest(), "bytes": path.stat().st_size}


@dataclass
class ClosedShard:
    """A finished shard under its temporary name, with what it holds."""

    index: int
    temp_name: str
    sha256: str
    nbytes: int
    names: list[str]
    groups: list[str]


@dataclass
class ShardWriter:
    out_dir: Path
    max_shard_bytes: int
    metadata: dict[str, str] = field(default_factory=lambda: {C.META_FORMAT_KEY: C.META_FORMAT_VALUE})
    closed: list[ClosedShard] = field(default_factory=list)
    on_close: object = None  # callable(ClosedShard) -> None, e.g. the resume journal
    retry: str = ""  # how to go on after a failed write (default: re-run with --resume)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self._entries: list[tuple[str, str, list[int], int, int]] = []
        self._groups: list[str] = []
        self._size = 0
        self._data = None

    def _retry(self) -> str:
        return self.retry or f"re-run with {opt('resume')}"

    @property
    def next_index(self) -> int:
        return len(self.closed) + 1

    def _data_path(self) -> Path:
        return self.out_dir / (C.PARTIAL_SHARD_TEMPLATE.format(index=self.next_index) + C.DATA_SUFFIX)

    def add_group(self, group: str, tensors: dict[str, torch.Tensor]) -> int:
        """Append the tensors of one weight to the current shard (never split across shards); return its index."""
        items = sorted(tensors.items(), key=lambda kv: (-kv[1].element_size(), kv[0]))
        total = sum(t.numel() * t.element_size() for _, t in items)
        if self._entries and self._size + total > self.max_shard_bytes:
            self.close_shard()
        if self._data is None:
            self._data = open(self._data_path(), "wb")  # noqa: SIM115  (kept open across calls)
        for name, t in items:
            if t.dtype not in ST_CODES:
                raise LplrError(f"tensor {name} has dtype {t.dtype}, which safetensors cannot store")
            buf = tensor_bytes(t)
            try:
                self._data.write(buf)
            except OSError as e:
                raise LplrError(f"writing {self.out_dir} failed ({e.strerror or e}); free disk space and "
                                f"{self._retry()}") from None
            self._entries.append((name, ST_CODES[t.dtype], list(t.shape), self._size, self._size + len(buf)))
            self._size += len(buf)
        self._groups.append(group)
        return self.next_index

    def close_shard(self) -> ClosedShard | None:
        """Write header + data of the current shard to `<name>.partial`, fsync, rename to the temp shard name."""
        if self._data is None:
            return None
        data_path = self._data_path()
        temp_name = C.PARTIAL_SHARD_TEMPLATE.format(index=self.next_index).removesuffix(C.PARTIAL_SUFFIX)
        partial = self.out_dir / (temp_name + C.PARTIAL_SUFFIX)
        try:
            self._data.flush()
            self._data.close()
            self._data = None
            digest = hashlib.sha256()  # of exactly the bytes written: no second read of the shard
            with open(partial, "wb") as out, open(data_path, "rb") as data:
                header = serialize_header(self._entries, self.metadata)
                out.write(header)
                digest.update(header)
                while chunk := data.read(16 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(partial, self.out_dir / temp_name)
        except OSError as e:
            partial.unlink(missing_ok=True)
            raise LplrError(f"writing shard {temp_name} in {self.out_dir} failed ({e.strerror or e}); free disk "
                            f"space and {self._retry()}") from None
        data_path.unlink(missing_ok=True)
        shard = ClosedShard(self.next_index, temp_name, digest.hexdigest(),
                            (self.out_dir / temp_name).stat().st_size, [e[0] for e in self._entries],
                            list(self._groups))
        self.closed.append(shard)
        self._entries, self._groups, self._size = [], [], 0
        if self.on_close is not None:
            self.on_close(shard)
        return shard

    def final_names(self) -> list[str]:
        """The final file names of the closed shards (`model-0000i-of-0000N.safetensors`)."""
        return [C.SHARD_TEMPLATE.format(index=s.index, total=len(self.closed)) for s in self.closed]

    def finalize(self) -> tuple[dict[str, str], dict[str, dict]]:
        """Close the last shard and rename all to their final names; return (weight_map, {file: sha/bytes})."""
        self.close_shard()
        weight_map: dict[str, str] = {}
        files: dict[str, dict] = {}
        for shard, final in zip(self.closed, self.final_names()):
            os.replace(self.out_dir / shard.temp_name, self.out_dir / final)
            for name in shard.names:
                weight_map[name] = final
            files[final] = {"sha256": shard.sha256, "bytes": shard.nbytes}
        return weight_map, files

    def abort(self) -> None:
        """Close the data file of an unfinished shard (left on disk, clearly partial)."""
        if self._data is not None:
            try:
                self._data.close()
            except OSError:
                pass  # e.g. the disk is full: the partial data file stays clearly partial
            self._data = None


def write_index(out_dir: Path, weight_map: dict[str, str], total_size: int) -> None:
    """`model.safetensors.index.json` as transformers writes it: total_size, then the weight map sorted by name."""
    write_json_atomic(Path(out_dir) / C.SAFE_INDEX, {"metadata": {"total_size": total_size},
                                                     "weight_map": dict(sorted(weight_map.items()))})
