"""`verify`: check a converted directory against its manifest: every byte of the manifest (its digests), every file in
the directory (listed ones by size and sha256, unlisted ones named), every record's stored parts decoded cheaply
(shapes, widths, quantizer specs, scales; a full decode with `full`), and with a source its identity (the sha256 the
manifest records of every weight file) and a sample of recomputed errors."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from loguru import logger

from . import constants as C
from .dtypes import dtype_name
from .errors import LplrError, opt
from .io.manifest import Manifest, TensorRecord, digest_problems, is_intact, not_a_file, sha256_file
from .io.output import ConvertedOutput, record_problem
from .io.reader import open_source
from .math.error import relative_error

__all__ = ["check_is_the_source", "file_problems", "record_problems", "unlisted_files", "verify"]

# The report's files: a manifest written before the report was listed in it does not list them.
_REPORT_NAMES = frozenset({C.REPORT_JSON, C.REPORT_CSV, C.REPORT_MD, C.PLOT_ERROR, C.PLOT_OUTPUT_ERROR, C.PLOT_BITS,
                           C.PLOT_SPECTRUM})


def _sample(records: list[TensorRecord], k: int) -> list[TensorRecord]:
    """Up to k compressed tensors: the largest plus evenly spaced others (deterministic)."""
    comp = [r for r in records if r.method != "copy"]
    if len(comp) <= k:
        return comp
    step = len(comp) / k
    picked = {int(i * step) for i in range(k)}
    picked.add(max(range(len(comp)), key=lambda i: comp[i].stored_bytes))
    return [comp[i] for i in sorted(picked)][:k + 1]


def _listed(manifest: Manifest) -> dict[str, dict]:
    return {**manifest.shards, **manifest.files, **manifest.report}


def file_problems(root: Path, manifest: Manifest, digest: Callable[[Path], str] = sha256_file) -> list[str]:
    """What differs between the shards and files a manifest lists (the report's too) and those in `root` (missing,
    not a regular file, other size or sha256 by `digest`); empty when every one matches."""
    problems = []
    from .io.reader import source_roots

    roots = source_roots(root)
    for rel, meta in sorted(_listed(manifest).items()):
        f = root / rel
        why = not_a_file(f, roots)
        if why is not None:
            problems.append(f"{rel} {why} although {C.MANIFEST_FILE} lists it")
        elif not is_intact(f, meta, digest):
            problems.append(f"{rel} does not match its sha256 in the manifest")
    return problems


def unlisted_files(root: Path, manifest: Manifest) -> tuple[list[str], list[str]]:
    """(files in `root` that the manifest does not list, notes): the manifest and the lock file belong to the output,
    hidden entries (a tool's cache) are noted, and a manifest written before the report was listed leaves the
    report's files unchecked (noted)."""
    from .io.outdir import entries

    listed = set(_listed(manifest)) | {C.MANIFEST_FILE}
    legacy = manifest.digests is None
    unlisted, notes = [], []
    for rel in entries(root):
        if rel in listed:
            continue
        if any(part.startswith(".") for part in rel.split("/")):
            notes.append(f"{rel} is hidden and not part of the output (push does not upload it)")
        elif legacy and rel in _REPORT_NAMES:
            notes.append(f"{rel} is not checked: this manifest predates listing the report's files")
        else:
            unlisted.append(rel)
    return unlisted, notes


def _unlisted_problems(root: Path, manifest: Manifest, notes: list[str]) -> list[str]:
    unlisted, more = unlisted_files(root, manifest)
    notes += more
    if manifest.digests is not None and (set(unlisted) & _REPORT_NAMES):
        fix = f"run `lplr-convert report --in-path {root}` to write and list the report again"
    else:
        fix = "it was added after the conversion: remove it (push would not publish it)"
    return [f"{rel} is in the output but {C.MANIFEST_FILE} does not list it ({fix})" for rel in unlisted]


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


def record_problems(output: ConvertedOutput) -> list[str]:
    """Every record decoded as far as that is cheap (no dense matrix; fit for a 70B output): method, quantizer specs,
    the stored parts' names, dtypes and shapes against the specs and the weight's shape, the padding bits of every
    bit-packed tensor (zero as written), and scales and zeros finite unless the record says the source was not."""
    problems = []
    for rec in output.records:
        why, packed = record_problem(rec)
        if why is None:
            why = _stored_problem(output, rec, packed)
        if why is not None:
            problems.append(f"tensor {rec.name} {why}; no loader can decode it")
    return problems


def _stored_problem(output: ConvertedOutput, rec: TensorRecord, packed: dict[str, tuple[int, int]]) -> str | None:
    import torch

    for full in rec.stored:
        if full in packed:
            bits, count = packed[full]
            used = count * bits % 8
            if used and int(output.stored_tensor(rec, full, last=True)[0]) >> used:
                return f"stores {full} with padding bits set (not as written at {bits} bits)"
        elif not rec.nonfinite and full.endswith((f".{C.FIELD_SCALE}", f".{C.FIELD_ZERO}")):
            t = output.stored_tensor(rec, full)
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return f"stores non-finite values in {full}"
    return None


def _full_problems(output: ConvertedOutput) -> list[str]:
    """Every record decoded in full (one dense tensor at a time); non-finite values where the source had none."""
    import torch

    problems = []
    for rec in output.records:
        try:
            W = output.dense(rec)
        except LplrError as e:
            problems.append(str(e))
            continue
        if W.is_floating_point() and not rec.nonfinite and not bool(torch.isfinite(W).all()):
            problems.append(f"tensor {rec.name} decodes to non-finite values although its source had none")
    return problems


def check_is_the_source(root: Path, out: Path, source: dict, option: str) -> None:
    """`root` must be the checkpoint `out` was converted from: every weight file whose sha256 the manifest records is
    there with that sha256 (another checkpoint of the same shapes would give numbers about a different model)."""
    files = source.get(C.M_FILES) if isinstance(source.get(C.M_FILES), dict) else {}
    for rel, digest in sorted(files.items()):
        path = root / rel
        why = "is missing" if not path.is_file() else "differs" if sha256_file(path) != digest else None
        if why:
            raise LplrError(f"{opt(option)} {root} is not the checkpoint {out} was converted from: its {rel} "
                            f"{why} (the manifest records sha256 {str(digest)[:12]}...); pass the checkpoint that was "
                            f"converted")


def _error_problems(output: ConvertedOutput, source: str, sample: int, tolerance: float, checked: list,
                    notes: list[str]) -> list[str]:
    problems = []
    src = open_source(source)
    if not output.manifest.source.get(C.M_FILES):
        notes.append(f"the manifest records no sha256 of the source's files: {opt('source')} is compared by shapes "
                     f"and errors only")
    want = {r.name: r for r in _sample(output.records, sample)}
    for name in sorted(set(want) & set(src.headers)):  # the plainest difference first
        h, rec = src.headers[name], want[name]
        if list(h.shape) != list(rec.shape) or dtype_name(h.dtype) != rec.dtype:
            raise LplrError(f"the source's {name} is {dtype_name(h.dtype)} {list(h.shape)}, the output's "
                            f"{rec.dtype} {rec.shape}: {opt('source')} {source} is not the checkpoint this was "
                            f"converted from; pass that one")
    check_is_the_source(Path(src.root), output.root, output.manifest.source, "source")
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


def verify(path: str | os.PathLike, source: str | None = None, sample: int = 8, tolerance: float = 1e-3,
           full: bool = False) -> dict:
    """Check every section of the manifest against its digests, every file in the directory (listed ones by size and
    sha256; any other is a problem), every stored tensor's presence, shape and dtype, and every record's parts
    decoded cheaply (`full`: decoded whole); with `source`, its identity (sha256 of its weight files) and the
    recomputed error of a sample of tensors. Raises LplrError naming the first problem; returns what was checked
    and `notes` (what could not be checked, e.g. sections of a manifest written before digests existed)."""
    notes: list[str] = []
    with ConvertedOutput(path, verify=False, check_records=False) as output:
        manifest = output.manifest
        problems = digest_problems(output.document)
        if problems is None:
            problems = []
            notes.append(f"{C.MANIFEST_FILE} predates per-section digests: only its tensor records and shard hashes "
                         f"are covered (its source, options, summary and eval sections are not); re-convert to "
                         f"cover them")
        problems += file_problems(output.root, manifest) + _unlisted_problems(output.root, manifest, notes)
        problems += _tensor_problems(output)
        if not problems:
            problems += record_problems(output)
        if full and not problems:
            problems += _full_problems(output)
        checked: list[dict] = []
        if source is not None and not problems:
            problems += _error_problems(output, source, sample, tolerance, checked, notes)
        n_files = len(_listed(manifest)) + 1
        n_tensors = len(output.records)
    for note in notes:
        logger.warning(note)
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        for p in problems[1:]:
            logger.error(p)
        raise LplrError(f"verify failed: {problems[0]}{more}; re-run the conversion or re-download the files")
    return {"files": n_files, "tensors": n_tensors, "errors_checked": checked, "decoded": "full" if full else "parts",
            "notes": notes}
