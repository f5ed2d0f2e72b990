"""`verify`: check a converted directory against its manifest, and optionally its errors against the source."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from loguru import logger

from . import constants as C
from .dtypes import dtype_name
from .errors import LplrError, opt
from .io.manifest import Manifest, TensorRecord, is_intact, sha256_file
from .io.output import ConvertedOutput
from .io.reader import open_source
from .math.error import relative_error

__all__ = ["file_problems", "verify"]


def _sample(records: list[TensorRecord], k: int) -> list[TensorRecord]:
    """Up to k compressed tensors: the largest plus evenly spaced others (deterministic)."""
    comp = [r for r in records if r.method != "copy"]
    if len(comp) <= k:
        return comp
    step = len(comp) / k
    picked = {int(i * step) for i in range(k)}
    picked.add(max(range(len(comp)), key=lambda i: comp[i].stored_bytes))
    return [comp[i] for i in sorted(picked)][:k + 1]


def file_problems(root: Path, manifest: Manifest, digest: Callable[[Path], str] = sha256_file) -> list[str]:
    """What differs between the shards and files a manifest lists and those in `root` (missing, other size or
    sha256 by `digest`); empty when every one matches."""
    problems = []
    listed = {**manifest.shards, **manifest.files}
    for rel, meta in sorted(listed.items()):
        f = root / rel
        if not f.is_file():
            problems.append(f"{rel} is missing although {C.MANIFEST_FILE} lists it")
        elif not is_intact(f, meta, digest):
            problems.append(f"{rel} does not match its sha256 in the manifest")
    return problems


def _tensor_problems(output: ConvertedOutput) -> list[str]:
    problems = []
    try:
        stored = output.headers()
    except LplrError as e:
        return [str(e)]
    for rec in output.records:
        for name, meta in rec.stored.items():
            got = stored.get(name)
            if got is None:
                problems.append(f"tensor {name} is missing from {rec.shard}")
            elif got[0] != rec.shard or dtype_name(got[1]) != meta.get("dtype") or \
                    list(got[2]) != list(meta.get("shape", ())):
                problems.append(f"tensor {name} is in {got[0]} as {got[1]} {list(got[2])}, the manifest says "
                                f"{rec.shard} {meta.get('dtype')} {meta.get('shape')}")
    return problems


def _error_problems(output: ConvertedOutput, source: str, sample: int, tolerance: float, checked: list) -> list[str]:
    problems = []
    src = open_source(source)
    want = {r.name: r for r in _sample(output.records, sample)}
    for name in sorted(set(want) & set(src.headers)):
        h, rec = src.headers[name], want[name]
        if list(h.shape) != list(rec.shape) or dtype_name(h.dtype) != rec.dtype:
            raise LplrError(f"the source's {name} is {dtype_name(h.dtype)} {list(h.shape)}, the output's "
                            f"{rec.dtype} {rec.shape}: {opt('source')} {source} is not the checkpoint this was "
                            f"converted from; pass that one")
    for name, W in src.iter_tensors(list(want)):
        rec = want[name]
        err = float(relative_error(W, output.dense(rec)))  # as the conversion measured it
        checked.append({"name": name, "manifest": rec.rel_error, "recomputed": err})
        if abs(err - rec.rel_error) > tolerance * max(rec.rel_error, 1e-6) + 1e-7:
            problems.append(f"tensor {name}: recomputed error {err:.6g} differs from the manifest's "
                            f"{rec.rel_error:.6g}")
    missing = set(want) - {c["name"] for c in checked}
    if missing:
        problems.append(f"the source lacks {len(missing)} converted tensors (first: {min(missing)}); "
                        f"{opt('source')} is not the checkpoint this was converted from")
    return problems


def verify(path: str | Path, source: str | None = None, sample: int = 8, tolerance: float = 1e-3) -> dict:
    """Recompute every file's sha256 against the manifest, check every stored tensor's presence, shape and dtype,
    and with `source` recompute the error of a sample of tensors. Raises LplrError naming the first problem."""
    with ConvertedOutput(path, verify=False) as output:
        problems = file_problems(output.root, output.manifest) + _tensor_problems(output)
        checked: list[dict] = []
        if source is not None and not problems:
            problems += _error_problems(output, source, sample, tolerance, checked)
        n_files = len(output.manifest.shards) + len(output.manifest.files)
        n_tensors = len(output.records)
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        for p in problems[1:]:
            logger.error(p)
        raise LplrError(f"verify failed: {problems[0]}{more}; re-run the conversion or re-download the files")
    return {"files": n_files, "tensors": n_tensors, "errors_checked": checked}
