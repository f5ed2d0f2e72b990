"""`verify`: check a converted directory against its manifest, and optionally its errors against the source."""

from __future__ import annotations

from pathlib import Path

import torch
from loguru import logger

from . import constants as C
from .errors import LplrError
from .io.manifest import read_manifest, sha256_file
from .io.reader import _safetensors_header, open_source
from .loading import _decode, _Shards, _stored_parts

__all__ = ["verify"]


def _sample(records: list[dict], k: int) -> list[dict]:
    """Up to k compressed tensors: the largest plus evenly spaced others (deterministic)."""
    comp = [r for r in records if r["method"] != "copy"]
    if len(comp) <= k:
        return comp
    step = len(comp) / k
    picked = {int(i * step) for i in range(k)}
    picked.add(max(range(len(comp)), key=lambda i: comp[i]["stored_bytes"]))
    return [comp[i] for i in sorted(picked)][:k + 1]


def verify(path: str | Path, source: str | None = None, sample: int = 8, tolerance: float = 1e-3) -> dict:
    """Recompute every file's sha256 against the manifest, check every stored tensor's presence, shape and dtype,
    and with `source` recompute the error of a sample of tensors. Raises LplrError naming the first problem."""
    root = Path(path)
    manifest = read_manifest(root)
    problems: list[str] = []
    listed = {**{k: v for k, v in (manifest.get(C.M_SHARDS) or {}).items()},
              **{k: v for k, v in (manifest.get(C.M_FILES) or {}).items()}}
    for rel, meta in sorted(listed.items()):
        f = root / rel
        if not f.is_file():
            problems.append(f"{rel} is missing")
        elif f.stat().st_size != meta["bytes"] or sha256_file(f) != meta["sha256"]:
            problems.append(f"{rel} does not match its sha256 in the manifest")
    stored: dict[str, tuple[str, torch.dtype, tuple]] = {}
    for shard in manifest.get(C.M_SHARDS) or {}:
        if (root / shard).is_file():
            try:
                for h in _safetensors_header(root / shard, shard):
                    stored[h.name] = (shard, h.dtype, h.shape)
            except LplrError as e:
                problems.append(str(e))
    for rec in manifest[C.M_TENSORS]:
        for name, meta in rec["stored"].items():
            got = stored.get(name)
            if got is None:
                problems.append(f"tensor {name} is missing from {rec['shard']}")
            elif got[0] != rec["shard"] or str(got[1]).removeprefix("torch.") != meta["dtype"] or \
                    list(got[2]) != list(meta["shape"]):
                problems.append(f"tensor {name} is in {got[0]} as {got[1]} {list(got[2])}, the manifest says "
                                f"{rec['shard']} {meta['dtype']} {meta['shape']}")
    checked = []
    if source is not None and not problems:
        src = open_source(source)
        sample_recs = _sample(manifest[C.M_TENSORS], sample)
        want = {r["name"]: r for r in sample_recs}
        shards = _Shards(root, manifest, verify=False)
        for name, W in src.iter_tensors(list(want)):
            rec = want[name]
            W_hat = _decode(rec, _stored_parts(shards, rec))
            err = float((W.double() - W_hat.double()).norm() / W.double().norm().clamp_min(1e-300))
            checked.append({"name": name, "manifest": rec["rel_error"], "recomputed": err})
            if abs(err - rec["rel_error"]) > tolerance * max(rec["rel_error"], 1e-6) + 1e-7:
                problems.append(f"tensor {name}: recomputed error {err:.6g} differs from the manifest's "
                                f"{rec['rel_error']:.6g}")
        missing = set(want) - {c["name"] for c in checked}
        if missing:
            problems.append(f"the source lacks {len(missing)} converted tensors (first: {min(missing)}); "
                            f"--source is not the checkpoint this was converted from")
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        for p in problems[1:]:
            logger.error(p)
        raise LplrError(f"verify failed: {problems[0]}{more}; re-run the conversion or re-download the files")
    return {"files": len(listed), "tensors": len(manifest[C.M_TENSORS]), "errors_checked": checked}
