"""The STATS directory: one safetensors file of input second moments per block, and `lplr_calibration.json`.

Files are written under a `.partial` name, fsynced and renamed; the JSON is written last, so a directory with the
JSON is complete. `load_calibration` reads it back lazily, one file open at a time.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

import torch

from .. import constants as C
from ..errors import LplrError
from ..io.manifest import file_record, is_intact, is_plain_name, sha256_file, write_json_atomic
from ..io.outdir import Resumable, check_replaceable, entries, recorded_files, replaceable_output
from ..io.reader import SourceCheckpoint, inside
from ..io.writer import write_tensors_atomic

__all__ = ["CalibrationStats", "check_stats_output", "file_record", "load_calibration", "save_block", "source_files",
           "stats_output"]

_CALIB_FILE = re.compile(rf"{C.CALIB_FILE_PATTERN}|{re.escape(C.CALIB_SENSITIVITY_FILE)}")
_OURS = re.compile(rf"({C.CALIB_FILE_PATTERN}|{re.escape(C.CALIB_SENSITIVITY_FILE)}|{C.CALIB_HIDDEN_PATTERN}|"
                   rf"{re.escape(C.CALIB_MANIFEST)}|{re.escape(C.CALIB_PROGRESS)})({re.escape(C.PARTIAL_SUFFIX)})?")


def _previous_stats(out: Path) -> set[str] | None:
    """The files an earlier calibrate wrote in `out`: those its manifest lists and every file under the names it
    writes (statistics, also partial ones, the journal and hidden-state checkpoint of an interrupted run). None when
    `out` holds neither a valid manifest nor such files."""
    ours = {e for e in entries(out) if _OURS.fullmatch(e)}
    listed = recorded_files(out / C.CALIB_MANIFEST)
    if listed is None and not ours:
        return None
    return (listed or set()) | ours


_STATS_WHAT = "calibration statistics"


def stats_output(out: Path, src_root: Path, overwrite: bool, resume: bool = False):
    """The STATS directory `out` checked, locked and made writable for the whole run (a context manager): outside the
    source, new or empty, with `overwrite` holding only an earlier STATS (exactly its files are deleted), or with
    `resume` holding only an interrupted calibrate run (its journal says what is kept)."""
    return replaceable_output(src_root, out, overwrite, _previous_stats, _STATS_WHAT,
                              Resumable(C.CALIB_PROGRESS, C.CALIB_MANIFEST, resume))


def check_stats_output(out: Path, src_root: Path, overwrite: bool, resume: bool = False) -> None:
    """What `stats_output` would refuse, refused before the long work that precedes it (nothing is written)."""
    check_replaceable(src_root, out, overwrite, _previous_stats, _STATS_WHAT,
                      Resumable(C.CALIB_PROGRESS, C.CALIB_MANIFEST, resume))


def source_files(src: SourceCheckpoint) -> dict[str, dict]:
    """{weight file relative to the checkpoint root: {"sha256", "bytes"}} for every weight file of `src`."""
    return {f: file_record(Path(src.root) / f) for f in src.files}


def save_block(out: Path, block: int, tensors: dict[str, torch.Tensor]) -> tuple[str, dict]:
    """Write one block's statistics as `lplr_stats-<block>.safetensors` (temporary name, fsync, rename; hashed while
    written), in the layout safetensors' save_file gives: the widest dtype first, then by name."""
    name = C.CALIB_FILE_TEMPLATE.format(block=block)
    items = sorted(tensors.items(), key=lambda kv: (-kv[1].element_size(), kv[0]))
    record = write_tensors_atomic(out / name, items, {C.META_FORMAT_KEY: C.META_FORMAT_VALUE})
    return name, {**record, "block": block}


def write_manifest(out: Path, manifest: dict) -> None:
    write_json_atomic(out / C.CALIB_MANIFEST, manifest)


class CalibrationStats:
    """A STATS directory opened for reading: `statistic(weight_name)` gives E[x x^T] of that weight's input."""

    def __init__(self, root: Path, manifest: dict, device: str = "cpu", verify: bool = True):
        self.root, self.manifest, self.device, self.verify = root, manifest, device, verify
        self.weights: dict[str, dict] = manifest[C.S_WEIGHTS]
        self.statistics: dict[str, dict] = manifest[C.S_STATISTICS]
        self._open, self._open_name, self._verified, self._sensitivity = None, None, set(), None

    def __contains__(self, weight_name: str) -> bool:
        return weight_name in self.weights

    def key(self, weight_name: str) -> str:
        """The statistic key of a checkpoint weight (weights fed the same input share one key)."""
        self.require([weight_name])
        return self.weights[weight_name]["statistic"]

    def tokens(self, weight_name: str) -> int:
        """How many tokens the weight's statistic averages over."""
        return int(self.statistics[self.key(weight_name)]["tokens"])

    def statistic(self, weight_name: str) -> torch.Tensor:
        """E[x x^T] (in x in) over the calibration tokens of the input of `weight_name`, in the stored dtype."""
        key = self.key(weight_name)
        file = self.statistics[key]["file"]
        if self._open_name != file:
            self._open = None
            self._open = self._open_file(file)
            self._open_name = file
        return self._open.get_tensor(key)

    @property
    def has_sensitivity(self) -> bool:
        """Whether `calibrate --sensitivity-samples` measured the output sensitivity of the weights."""
        return isinstance(self.manifest.get(C.S_SENSITIVITY), dict)

    def sensitivity(self, weight_name: str) -> torch.Tensor | None:
        """The mean squared gradient of the next-token loss per output channel of `weight_name` (float32, out), or
        None when it was not measured (no sensitivity pass, or a weight the model's forward does not use)."""
        if not self.has_sensitivity:
            return None
        if self._sensitivity is None:
            self._sensitivity = self._open_file(C.CALIB_SENSITIVITY_FILE)
        key = f"{weight_name.removesuffix('.weight')}.{C.CALIB_SENSITIVITY_SUFFIX}"
        return self._sensitivity.get_tensor(key) if key in set(self._sensitivity.keys()) else None

    def _open_file(self, file: str):
        from safetensors import safe_open

        path = self.root / file
        meta = self.manifest[C.M_FILES].get(file, {})
        if not path.is_file():
            raise LplrError(f"{path} is missing; re-run `lplr-convert calibrate` for {self.root}")
        if self.verify and file not in self._verified:
            if not is_intact(path, meta):
                raise LplrError(f"{path} does not match the sha256 in {C.CALIB_MANIFEST} (damaged or modified); "
                                f"re-run `lplr-convert calibrate`")
            self._verified.add(file)
        return safe_open(str(path), framework="pt", device=str(self.device))

    def close(self) -> None:
        """Release the open statistics files (reading again reopens them)."""
        self._open, self._open_name, self._sensitivity = None, None, None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Statistic key -> its stored shape, read from the files' headers (no data is read)."""
        from ..io.reader import safetensors_header

        out = {}
        for file in self.manifest[C.M_FILES]:
            if file == C.CALIB_SENSITIVITY_FILE:
                continue
            path = self.root / file
            if path.is_file():
                out.update({h.name: tuple(h.shape) for h in safetensors_header(path, file)})
        return out

    def require(self, names: Iterable[str]) -> None:
        """Raise naming the first of `names` that has no statistic."""
        for name in names:
            if name not in self.weights:
                raise LplrError(f"the calibration statistics in {self.root} have none for {name}; re-run "
                                f"`lplr-convert calibrate` on the checkpoint this weight belongs to")

    def check_source(self, src: SourceCheckpoint) -> None:
        """Raise unless `src` has exactly the weight files (names, sha256) the statistics were made from."""
        self.check_hashes({f: sha256_file(Path(src.root) / f) for f in src.files}, src.root)

    def check_hashes(self, hashes: dict[str, str], root) -> None:
        """Raise unless the checkpoint whose weight files have these sha256 (name -> hex) is the one the statistics
        were made from (`root` only names it in the message)."""
        made = self.manifest[C.M_SOURCE][C.M_FILES]
        where = f"the calibration statistics in {self.root} were made from a different checkpoint"
        fix = f"re-run `lplr-convert calibrate` on {root}"
        if sorted(made) != sorted(hashes):
            raise LplrError(f"{where} (weight files {', '.join(sorted(made))}, not {', '.join(sorted(hashes))}); "
                            f"{fix}")
        for f, digest in hashes.items():
            if digest != made[f]["sha256"]:
                raise LplrError(f"{where} ({f} has another sha256); {fix}")

    def digest(self) -> str:
        """sha256 of the statistics' manifest (which holds every statistics file's sha256)."""
        return sha256_file(self.root / C.CALIB_MANIFEST)


def load_calibration(path: str | Path, device: str = "cpu", verify: bool = True) -> CalibrationStats:
    """Open a STATS directory written by `calibrate`. With verify, each file's sha256 is checked when first read."""
    root = Path(path)
    mpath = root / C.CALIB_MANIFEST
    rerun = f"re-run `lplr-convert calibrate` into {root}"
    if not mpath.is_file():
        if (root / C.CALIB_PROGRESS).is_file():
            raise LplrError(f"{root} holds an interrupted calibrate run (no {C.CALIB_MANIFEST}); finish it with "
                            f"`lplr-convert calibrate ... --resume`")
        raise LplrError(f"{root} has no {C.CALIB_MANIFEST}, so it holds no finished calibration; {rerun}")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else e
        raise LplrError(f"{mpath} is unreadable or not valid JSON ({why}); {rerun}") from None
    version = manifest.get(C.M_FORMAT_VERSION) if isinstance(manifest, dict) else None
    if version is None or manifest.get(C.S_KIND) != C.CALIB_KIND:
        raise LplrError(f"{mpath} is not an lplr-convert calibration manifest; {rerun}")
    if str(version).split(".")[0] != C.CALIB_FORMAT_VERSION.split(".")[0]:
        raise LplrError(f"{mpath} has format version {version}, this tool reads {C.CALIB_FORMAT_VERSION}; upgrade "
                        f"lplr-convert or {rerun}")
    problem = _manifest_problem(manifest)
    if problem:
        raise LplrError(f"{mpath} is malformed ({problem}); it is not a manifest calibrate wrote: {rerun}")
    for file in manifest[C.M_FILES]:  # a link out of the STATS directory is not followed
        inside((root.resolve(),), root / file, "statistics file")
    return CalibrationStats(root, manifest, device, verify)


def _mapping_of_mappings(doc: dict, key: str) -> dict | None:
    value = doc.get(key)
    return value if isinstance(value, dict) and all(isinstance(v, dict) for v in value.values()) else None


def _manifest_problem(manifest: dict) -> str | None:
    """What makes a calibration manifest unusable (wrong types, names outside its directory, dangling references),
    or None. Every statistics file it names must be a plain file name inside the STATS directory."""
    files, stats = _mapping_of_mappings(manifest, C.M_FILES), _mapping_of_mappings(manifest, C.S_STATISTICS)
    weights = _mapping_of_mappings(manifest, C.S_WEIGHTS)
    source = manifest.get(C.M_SOURCE)
    made = _mapping_of_mappings(source, C.M_FILES) if isinstance(source, dict) else None
    for key, value in ((C.M_FILES, files), (C.S_STATISTICS, stats), (C.S_WEIGHTS, weights),
                       (f"{C.M_SOURCE}.{C.M_FILES}", made)):
        if value is None:
            return f"{key} is not a mapping of records"
    bad = next((f for f in files if not is_plain_name(f) or not _CALIB_FILE.fullmatch(f)), None)
    if bad is not None:
        return f"it names the statistics file {bad!r}, not a file of the STATS directory"
    bad = next((k for k, v in stats.items() if not isinstance(v.get("file"), str) or v["file"] not in files
                or not isinstance(v.get("tokens"), int)), None)
    if bad is not None:
        return f"statistic {bad!r} names no listed file or has no token count"
    bad = next((k for k, v in weights.items() if not isinstance(v.get("statistic"), str) or v["statistic"] not in stats),
               None)
    if bad is not None:
        return f"weight {bad!r} names no listed statistic"
    bad = next((k for k, v in made.items() if not isinstance(v.get("sha256"), str)), None)
    if bad is not None:
        return f"source file {bad!r} has no sha256"
    sens = manifest.get(C.S_SENSITIVITY)
    if sens is not None and (not isinstance(sens, dict) or C.CALIB_SENSITIVITY_FILE not in files):
        return f"{C.S_SENSITIVITY} names no listed file"
    return None
