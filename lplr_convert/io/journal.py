"""The resume journal (`lplr_progress.json`): the fingerprint of a run, its finished shards with their tensor records,
and the other files it announced before writing them. `--resume` keeps what the journal proves intact."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from loguru import logger

from .. import constants as C
from ..dtypes import dtype_name
from ..errors import LplrError, opt
from .manifest import TensorRecord, is_intact, write_json_atomic
from .reader import safetensors_header
from .writer import ClosedShard

__all__ = ["Journal", "check_fingerprint", "read_journal", "remove_except", "resume_state"]

# Fingerprint keys that are not command-line settings, and how a change of each is told.
_CHANGED = {"source_files": "the source files changed", "config": "the source's config.json changed",
            "format_version": "the output format changed (another lplr-convert version)",
            "tool_version": "lplr-convert was upgraded",
            "executor": "the executor (in-process, local pool or ray, from --workers/--devices/--ray-address) changed",
            "arithmetic": "the compute device's automatic arithmetic (bfloat16 sketch, int8 products) changed",
            "allocation": "the global allocation (--target-bits-per-param) chose differently"}


class Journal:
    """Written after every finished shard (fsync + rename), removed when the conversion completes."""

    def __init__(self, out: Path, fingerprint: dict, shards: list[dict] | None = None):
        self.path, self.fingerprint = out / C.PROGRESS_FILE, fingerprint
        self.shards: list[dict] = list(shards or [])
        self.files: list[str] = []
        self.pending: dict[str, TensorRecord] = {}

    def save(self) -> None:
        write_json_atomic(self.path, {"fingerprint": self.fingerprint, "shards": self.shards, "files": self.files},
                          indent=None)

    def on_close(self, shard: ClosedShard) -> None:
        records = [self.pending.pop(g).to_json() for g in shard.groups]
        self.shards.append({"index": shard.index, "temp_name": shard.temp_name, "sha256": shard.sha256,
                            "bytes": shard.nbytes, "names": shard.names, "groups": shard.groups,
                            "records": records})
        self.save()

    def announce(self, files: list[str]) -> None:
        """Record files about to be written (index, copied side files), so that a later --resume or --overwrite
        knows them as this run's own."""
        self.files = sorted(set(self.files) | set(files))
        self.save()

    def closed_shards(self) -> list[ClosedShard]:
        return [ClosedShard(s["index"], s["temp_name"], s["sha256"], s["bytes"], s["names"], s["groups"])
                for s in self.shards]

    def records(self) -> dict[str, TensorRecord]:
        return {r["name"]: TensorRecord.from_json(r) for s in self.shards for r in s["records"]}


# Inputs of the plan, told first: a changed recipe or config.json also changes settings derived from it, and the
# message should name the input the user changed, not a setting they never passed.
_INPUTS_FIRST = ("tool_version", "format_version", "source_files", "config", "recipe", "calibration")


def _what_changed(key: str, told: dict[str, str]) -> str:
    return told.get(key, _CHANGED.get(key, f"{opt(key)} changed"))


def _difference(old, new) -> str:
    """The first difference between two fingerprint values, short: a mapping's first differing key, a text's first
    differing line, else both values."""
    if isinstance(old, dict) and isinstance(new, dict):
        key = next(k for k in sorted(set(old) | set(new), key=str) if old.get(k) != new.get(k))
        return f"{key}: {str(old.get(key, '(absent)'))[:60]} -> {str(new.get(key, '(absent)'))[:60]}"
    if isinstance(old, str) and isinstance(new, str) and "\n" in old + new:
        a, b = old.splitlines(), new.splitlines()
        i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        return f"line {i + 1}: {(a[i] if i < len(a) else '(end)')[:60]!r} -> {(b[i] if i < len(b) else '(end)')[:60]!r}"
    return f"was {str(old)[:80]}, now {str(new)[:80]}"


def read_journal(path: Path, keys: tuple[str, ...]) -> dict:
    """A journal's JSON, a mapping with a fingerprint mapping and `keys`; a damaged one is a one-line error."""
    try:
        journal = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(journal["fingerprint"], dict) or any(k not in journal for k in keys):
            raise KeyError
        return journal
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise LplrError(f"{path} is damaged; start again with {opt('overwrite')}") from None


def check_fingerprint(out: Path, old: dict, new: dict, first: tuple[str, ...] = _INPUTS_FIRST,
                      told: dict[str, str] | None = None) -> None:
    """Refuse to resume in `out` when the interrupted run's fingerprint `old` differs from this run's `new`, naming
    the first difference: the keys in `first` (inputs) before the others (settings, named by their option unless
    `told` or the common inputs describe them)."""
    keys = set(old) | set(new)
    for key in [*(k for k in first if k in keys), *sorted(keys - set(first))]:
        if old.get(key) != new.get(key):
            raise LplrError(f"cannot resume in {out}: {_what_changed(key, told or {})} since the interrupted run "
                            f"({_difference(old.get(key), new.get(key))}); rerun with the same settings or use "
                            f"{opt('overwrite')}")


def remove_except(out: Path, keep: set[str]) -> None:
    """Delete every file below `out` whose relative name is not in `keep` (nor the lock), and directories left empty:
    what an interrupted run wrote and its journal does not vouch for is redone."""
    for p in sorted(out.rglob("*"), key=lambda p: -len(p.parts)):
        rel = p.relative_to(out).as_posix()
        if rel in keep or rel == C.LOCK_FILE:
            continue
        if p.is_dir() and not p.is_symlink():
            if not any(p.iterdir()):
                p.rmdir()
        else:
            p.unlink()


def _shard_problem(out: Path, s, index: int, expected: Mapping[str, dict], kept: set[str]) -> str | None:
    """Why the journal's entry `s` for the `index`-th finished shard cannot be kept, or None: it must name the file
    this run writes as that shard, intact by size and sha256, whose header lists exactly the stored tensors of its
    records; each record must be of a tensor this run plans (same shape, dtype, orientation and settings, or copied
    verbatim), not kept in an earlier shard, and recorded in this shard. A journal edited by hand, or by another
    version, is checked against what it names before anything is kept."""
    if not isinstance(s, dict) or not isinstance(s.get("records"), list) or not isinstance(s.get("groups"), list) \
            or not isinstance(s.get("names"), list):
        return "its entry is malformed"
    temp = C.PARTIAL_SHARD_TEMPLATE.format(index=index).removesuffix(C.PARTIAL_SUFFIX)
    if s.get("index") != index or s.get("temp_name") != temp:
        return f"its entry names shard {s.get('index')!r} file {s.get('temp_name')!r} where shard {index} is {temp}"
    if not is_intact(out / temp, s):
        return "it is missing or damaged"
    try:
        header = {h.name: (dtype_name(h.dtype), list(h.shape)) for h in safetensors_header(out / temp, temp)}
        records = [TensorRecord.from_json(r) for r in s["records"]]
    except LplrError as e:
        return e.template
    groups = [r.name for r in records]
    if groups != s["groups"] or len(set(groups)) != len(groups) or sorted(header) != sorted(s["names"]):
        return "its records, tensor groups and file header disagree"
    stored: dict[str, tuple[str, list]] = {}
    for r in records:
        plan = expected.get(r.name)
        if plan is None:
            return f"it records tensor {r.name!r}, which this run does not plan"
        if r.name in kept:
            return f"tensor {r.name} is recorded twice"
        if r.shard != index:
            return f"tensor {r.name} is recorded in shard {r.shard!r}"
        same = r.method == "copy" and r.nonfinite or r.method == plan["method"] and \
            r.settings == plan["settings"] and r.transposed == plan["transposed"]
        if list(r.shape) != plan["shape"] or r.dtype != plan["dtype"] or not same:
            return f"the record of {r.name} does not match this run's plan for it"
        for key, meta in r.stored.items():
            if key != r.name and not key.startswith(r.name + ".") or key in stored or not isinstance(meta, dict):
                return f"the record of {r.name} names stored tensor {key!r}"
            stored[key] = (meta.get("dtype"), meta.get("shape"))
        kept.add(r.name)
    if stored != header:
        return "its records do not describe the tensors its file holds"
    return None


def resume_state(out: Path, fingerprint: dict, expected: Mapping[str, dict]) -> list[dict]:
    """Finished shards of an interrupted run that are intact on disk (checked by hash) and consistent with this run's
    plan (`expected`: tensor name -> {shape, dtype, method, settings, transposed}, JSON values; see `_shard_problem`);
    the first that is not is redone with everything after it (a warning names it and why), and everything else the
    run wrote is removed (`prepare_output` has checked that the directory holds nothing but that run's files)."""
    path = out / C.PROGRESS_FILE
    if not path.is_file():
        return []
    journal = read_journal(path, ("shards",))
    check_fingerprint(out, journal["fingerprint"], fingerprint)
    shards = journal["shards"] if isinstance(journal["shards"], list) else [None]
    kept, names = [], set()
    for i, s in enumerate(shards, 1):
        try:
            why = _shard_problem(out, s, i, expected, names)
        except (TypeError, ValueError, AttributeError, KeyError):
            why = "its entry is malformed"
        if why is not None:
            logger.warning(f"{C.PROGRESS_FILE}: finished shard {i} cannot be kept ({why}); redoing it and everything "
                           f"after it")
            break
        kept.append(s)
    remove_except(out, {s["temp_name"] for s in kept} | {C.PROGRESS_FILE})
    logger.info(f"resuming: {len(kept)} finished shard(s) kept, {sum(len(s['groups']) for s in kept)} tensors skipped")
    return kept
