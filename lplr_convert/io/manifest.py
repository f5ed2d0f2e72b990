"""`lplr_manifest.json`, the record of a conversion: typed records with a JSON round trip, reading, writing and the
integrity hash (schema in the README, keys in constants)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import constants as C
from ..errors import IncompleteOutputError, LplrError, opt

__all__ = ["Manifest", "TensorRecord", "digest_problems", "file_record", "integrity_hash", "is_complete", "is_intact",
           "is_plain_name", "not_a_file", "read_manifest", "seal_digests", "sha256_file", "upgrade_record",
           "write_json_atomic"]


def _settings_copy():
    """A record field that repeats one knob of the record's `settings` (None where the tensor's method has no such
    knob): written as format 1.0 always did, never read back (`settings` is the one form)."""
    return field(default=None, metadata={"settings_copy": True})


def is_plain_name(name: object) -> bool:
    """Whether `name` is a plain relative file path (posix, no `..`, `.` or empty parts, not absolute): the only kind
    of name a record of this tool (manifest, journal, export record) or an index may give a file beside it."""
    if not isinstance(name, str) or not name or name.startswith("/") or "\\" in name or "\0" in name:
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_record(path: str | os.PathLike) -> dict:
    """{"sha256", "bytes"} of a file, as the manifest lists files."""
    return {"sha256": sha256_file(path), "bytes": Path(path).stat().st_size}


def not_a_file(path: Path, roots: tuple[Path, ...] = ()) -> str | None:
    """Why `path` is not a regular file of the output ("is missing", "is a symbolic link", "is a directory", ...), or
    None when it is one. A link is followed only to a regular file inside one of `roots` (resolved directories: the
    output, a Hub cache snapshot's blobs): one pointing out of the output is never read."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return "is missing"
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if stat.S_ISLNK(mode):
        try:
            real = Path(path).resolve(strict=True)
        except (OSError, RuntimeError):  # dangling, or a loop
            return f"is a symbolic link (to {os.readlink(path)}) that leads to no file"
        if any(real == r or r in real.parents for r in roots):
            return not_a_file(real)
        return f"is a symbolic link (to {real}) out of the output, which no reader of this tool follows"
    if stat.S_ISDIR(mode):
        return "is a directory, not a file"
    if not stat.S_ISREG(mode):
        return "is not a regular file (a FIFO, socket or device)"
    return None


def is_intact(path: Path, record, digest: Callable[[Path], str] = sha256_file) -> bool:
    """Whether `path` is a file of the size and sha256 (by `digest`) that `record` ({"bytes", "sha256"}) gives; a
    record that is not a mapping vouches for nothing."""
    return isinstance(record, dict) and path.is_file() and path.stat().st_size == record.get("bytes") \
        and digest(path) == record.get("sha256")


@dataclass
class TensorRecord:
    """Everything the manifest records about one tensor."""

    name: str
    shape: list[int]
    dtype: str
    method: str
    layer: int | None = None
    matrix_type: str | None = None
    rank: int | None = None
    b1: int | None = _settings_copy()
    b2: int | None = _settings_copy()
    b0: int | None = _settings_copy()
    quantizer: str | None = _settings_copy()
    group_size: int | None = _settings_copy()
    rank_policy: str | None = None
    seed: int = 0
    transposed: bool = False
    reason: str = ""
    stored: dict[str, dict] = field(default_factory=dict)  # full stored name -> {dtype, shape, bytes}
    shard: int | str | None = None  # shard index while converting, the shard's file name once finished
    original_bytes: int = 0
    stored_bytes: int = 0
    bits_per_param: float = 0.0
    original_bits_per_param: float = 0.0
    rel_error: float = 0.0
    output_rel_error: float | None = None  # sqrt(tr(D H D^T) / tr(W H W^T)) with calibration's H, D = W - W_hat
    energy_kept: float | None = None
    seconds: float = 0.0
    grew: bool = False
    nonfinite: bool = False
    info: dict = field(default_factory=dict)  # what decoding needs (method-specific)
    settings: dict = field(default_factory=dict)  # the method's settings (Settings.to_json)
    extra: dict = field(default_factory=dict)  # method-specific facts for reports
    spectrum: dict | None = None  # energy curve of a tensor the report plots: {kind, curve, upper, exact_to}

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @classmethod
    def build(cls, name: str, shape, dtype: str, itemsize: int, settings: dict, stored: dict[str, dict], *,
              rank_policy: str | None, **facts) -> TensorRecord:
        """A record from a tensor's source dtype (name and bytes per element), its method's settings (JSON), what was
        stored ({full name: {dtype, shape, bytes}}) and the remaining facts; sizes, bits/param and the top-level
        knobs are derived here."""
        numel = max(1, math.prod(shape))
        original = math.prod(shape) * itemsize
        stored_bytes = sum(v["bytes"] for v in stored.values())
        return cls(name=name, shape=list(shape), dtype=dtype, method=settings["method"], rank_policy=rank_policy,
                   **{k: settings.get(k) for k in _copied_knobs()}, stored=stored, original_bytes=original,
                   stored_bytes=stored_bytes, bits_per_param=8 * stored_bytes / numel,
                   original_bits_per_param=8 * original / numel, grew=stored_bytes > original, settings=settings,
                   **facts)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TensorRecord:
        """A record from its JSON (keys this version does not know are ignored; missing ones take defaults)."""
        if not isinstance(d, Mapping):
            raise LplrError(f"a tensor record of the manifest is {type(d).__name__}, not a mapping; the output is "
                            f"damaged, re-run the conversion")
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in upgrade_record(d).items() if k in names})
        except TypeError as e:
            raise LplrError(f"a tensor record of the manifest is malformed ({e}); re-run the conversion") from None


def _copied_knobs() -> tuple[str, ...]:
    """The knobs a record repeats at top level (its `_settings_copy` fields)."""
    return tuple(f.name for f in dataclasses.fields(TensorRecord) if f.metadata.get("settings_copy"))


def upgrade_record(d: Mapping[str, Any]) -> dict:
    """A tensor record's JSON as this version reads it, from any earlier one: the one place old records are
    upgraded. Records written before they carried their `settings` get them from the knobs repeated at top level."""
    d = dict(d)
    if not d.get("settings"):
        d["settings"] = {"method": d.get("method"), **{k: d[k] for k in _copied_knobs() if d.get(k) is not None}}
    return d


@dataclass
class Manifest:
    """The whole manifest. `source` and `options` stay JSON mappings (their keys are documented in the README)."""

    format_version: str = C.FORMAT_VERSION
    tool: str = C.TOOL_NAME
    tool_version: str = ""
    complete: bool = False
    source: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    tensors: list[TensorRecord] = field(default_factory=list)
    shards: dict[str, dict] = field(default_factory=dict)
    files: dict[str, dict] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    eval: dict | None = None
    report: dict[str, dict] = field(default_factory=dict)  # report files written after the manifest
    integrity: str | None = None
    digests: dict[str, str] | None = None  # per top-level key (None: a manifest written before digests existed)

    def to_json(self) -> dict:
        """The JSON document, keys in the documented order, integrity and the digests last."""
        version = self.format_version
        if version == C.FORMAT_VERSION and any(C.INFO_INCOHERENCE in (r.info or {}) for r in self.tensors):
            version = C.FORMAT_VERSION_TRANSFORMED
        doc = {C.M_FORMAT_VERSION: version, C.M_TOOL: self.tool, C.M_TOOL_VERSION: self.tool_version,
               C.M_COMPLETE: self.complete, C.M_SOURCE: self.source, C.M_OPTIONS: self.options,
               C.M_TENSORS: [r.to_json() for r in self.tensors], C.M_SHARDS: self.shards, C.M_FILES: self.files,
               C.M_SUMMARY: self.summary, C.M_EVAL: self.eval, C.M_REPORT: self.report}
        doc[C.M_INTEGRITY] = self.integrity
        if self.digests is not None:
            doc[C.M_DIGESTS] = self.digests
        return doc

    def seal(self) -> Manifest:
        """Set the integrity hash from the tensor records and shard hashes, and the digest of every section."""
        self.integrity = integrity_hash(self.to_json())
        self.digests = section_digests(self.to_json())
        return self

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Manifest:
        tensors = doc.get(C.M_TENSORS)
        if not isinstance(tensors, list):
            raise LplrError("the manifest has no tensor list; the output is damaged, re-run the conversion")
        return cls(format_version=str(doc.get(C.M_FORMAT_VERSION)), tool=doc.get(C.M_TOOL, C.TOOL_NAME),
                   tool_version=doc.get(C.M_TOOL_VERSION, ""), complete=doc.get(C.M_COMPLETE) is True,
                   source=_mapping(doc, C.M_SOURCE), options=_mapping(doc, C.M_OPTIONS),
                   tensors=[TensorRecord.from_json(t) for t in tensors], shards=_mapping(doc, C.M_SHARDS),
                   files=_mapping(doc, C.M_FILES), summary=_mapping(doc, C.M_SUMMARY), eval=doc.get(C.M_EVAL),
                   report=_mapping(doc, C.M_REPORT), integrity=doc.get(C.M_INTEGRITY),
                   digests=doc.get(C.M_DIGESTS) if isinstance(doc.get(C.M_DIGESTS), dict) else None)

    @classmethod
    def coerce(cls, manifest: Manifest | Mapping) -> Manifest:
        """A Manifest from either a Manifest or its JSON document."""
        return manifest if isinstance(manifest, Manifest) else cls.from_json(manifest)


def _mapping(doc: Mapping, key: str) -> dict:
    value = doc.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise LplrError(f"the manifest's {key!r} is {type(value).__name__}, not a mapping; the output is damaged, "
                        f"re-run the conversion")
    return value


def integrity_hash(manifest: Mapping) -> str:
    """sha256 over the parts of a manifest the loader trusts: the tensor records and the shard hashes."""
    payload = {C.M_TENSORS: manifest.get(C.M_TENSORS), C.M_SHARDS: manifest.get(C.M_SHARDS)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _canonical(value) -> bytes:
    """The canonical JSON of a value as it reads back from a file (keys sorted, no spaces)."""
    return json.dumps(json.loads(json.dumps(value)), sort_keys=True, separators=(",", ":")).encode()


def section_digests(doc: Mapping) -> dict[str, str]:
    """sha256 of the canonical JSON of every top-level key of a manifest document but the digests themselves: with
    them, every byte that matters of the manifest is covered (integrity covers only tensors + shards, for the
    loaders, as format 1.0 always did)."""
    return {k: hashlib.sha256(_canonical(v)).hexdigest() for k, v in doc.items() if k != C.M_DIGESTS}


def seal_digests(doc: dict) -> dict:
    """Set the digests of a manifest document changed after the conversion by this tool (eval, the report's files);
    a manifest written before digests existed stays without them (they would vouch for what no digest checked)."""
    if C.M_DIGESTS in doc:
        doc[C.M_DIGESTS] = section_digests(doc)
    return doc


def digest_problems(doc: Mapping) -> list[str] | None:
    """What differs between a manifest document and its digests (sections changed, added or removed after the
    conversion); None for a manifest written before digests existed."""
    digests = doc.get(C.M_DIGESTS)
    if digests is None:
        return None
    if not isinstance(digests, dict):
        return [f"the manifest's {C.M_DIGESTS!r} is not a mapping (modified after the conversion)"]
    now = section_digests(doc)
    changed = sorted(k for k in set(now) | set(digests) if now.get(k) != digests.get(k))
    return [f"the manifest's {k!r} section was " + ("added" if k not in digests else "removed" if k not in now else
                                                    "modified") + " after the conversion (its digest does not match)"
            for k in changed]


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


def _load_json(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else e
        raise LplrError(f"{path} is unreadable or not valid JSON ({why}); re-run the conversion with "
                        f"{opt('overwrite')}") from None
    if not isinstance(manifest, dict) or manifest.get(C.M_FORMAT_VERSION) is None:
        raise LplrError(f"{path} is not an lplr-convert manifest; re-run the conversion with {opt('overwrite')}")
    return manifest


def _check_names(path: Path, manifest: dict) -> None:
    """Every shard and file a manifest lists must be a plain name inside its directory (a crafted manifest must not
    make a reader, `--overwrite` or `push` reach outside it)."""
    for key in (C.M_SHARDS, C.M_FILES):
        listed = manifest.get(key)
        bad = next((n for n in listed if not is_plain_name(n)), None) if isinstance(listed, dict) else None
        if bad is not None:
            raise LplrError(f"{path} lists {key} entry {bad!r}, which is not a plain file name inside "
                            f"{path.parent}; it is not a manifest this tool wrote: re-run the conversion")


def read_manifest(out_dir: str | os.PathLike, require_complete: bool = True) -> dict:
    """The manifest document (JSON) of a converted directory, checked.

    Raises IncompleteOutputError for a directory without a complete manifest (an interrupted conversion), and
    LplrError for anything that is not a conversion output at all, has another major format version, or whose
    tensor records or shard hashes were modified after the conversion.
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
                        f"(convert a checkpoint into it first)")
    manifest = _load_json(path)
    major = str(manifest[C.M_FORMAT_VERSION]).split(".")[0]
    if major not in C.FORMAT_MAJORS_READ:
        raise LplrError(f"{path} has format version {manifest[C.M_FORMAT_VERSION]}, this tool reads "
                        f"{' and '.join(m + '.x' for m in C.FORMAT_MAJORS_READ)}; upgrade lplr-convert or re-convert")
    if require_complete and manifest.get(C.M_COMPLETE) is not True:
        raise IncompleteOutputError(f"{out_dir} holds an incomplete conversion; finish it with "
                                    f"`lplr-convert convert ... --resume`")
    _check_names(path, manifest)
    if manifest.get(C.M_INTEGRITY) != integrity_hash(manifest):
        raise LplrError(f"{path} was modified after the conversion (its integrity hash does not match); "
                        f"re-run the conversion with {opt('overwrite')}")
    return manifest
