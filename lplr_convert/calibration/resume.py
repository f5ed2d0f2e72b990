"""Resuming `calibrate`: the journal of a run in its STATS directory and the checkpoint of the hidden states between
block runs.

A block's statistics depend on the hidden states entering its first call and on the other arguments of its calls.
Those arguments come from the capture forward (`run._capture`), which a resumed run repeats: the recording forward
never sees a block's real output (its stand-ins pass their input on), so it records the same arguments the
uninterrupted run used, for every call, the repeated calls of a block the forward runs several times (ALBERT's
shared group) included. Beyond the journal, a resumed run needs only the hidden states after the last finished block
run: one tensor per batch, in the compute dtype, samples x seq_len x hidden values in all.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from loguru import logger

from .. import __version__
from .. import constants as C
from ..errors import LplrError, opt
from ..io.journal import check_fingerprint, read_journal, remove_except
from ..io.manifest import is_intact, write_json_atomic
from ..io.writer import write_tensors_atomic

__all__ = ["CalibrationJournal", "add_block", "fingerprint", "load_hidden", "resume_journal"]

# Inputs first (see io.journal.check_fingerprint), and how a change of each key that is no option is told.
_FIRST = ("tool_version", "format_version", "torch", "transformers", "source_files", "config", "text", "dataset",
          "samples", "seq_len", "token_ids", "schedule")
_TOLD = {"format_version": "the statistics format changed (another lplr-convert version)",
         "torch": "the installed torch changed", "transformers": "the installed transformers changed",
         "text": "the calibration text changed", "dataset": "the calibration dataset (name, config, split, column or "
         "fingerprint) changed", "token_ids": "the calibration samples' token ids changed (another "
         "tokenizer?)", "schedule": "the order in which the model calls its blocks changed",
         "threads": "torch's CPU thread count (OMP_NUM_THREADS) changed",
         "sequential": "the sequential calibration's transform (method and settings) changed"}
_STATS_FILE = re.compile(C.CALIB_FILE_PATTERN)
_METADATA = {C.META_FORMAT_KEY: C.META_FORMAT_VALUE}
_ENTRY = ("record", "statistics", "weights")  # the mappings of a journaled block run besides its file name


def fingerprint(header: dict, config: dict | None, seqs: list[list[int]], schedule: list[int]) -> dict:
    """Everything that decides the statistics' bytes, from the manifest header of the run: resuming with any of it
    changed is refused. CPU results depend on torch's thread count in the last bits, so it counts on the CPU."""
    import transformers

    src = header[C.M_SOURCE]
    cpu = header["device"].split(":")[0] == "cpu"
    return {"format_version": header[C.M_FORMAT_VERSION], "tool_version": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__,
            "source_files": {f: r["sha256"] for f, r in src[C.M_FILES].items()}, "config": config,
            "text": header[C.S_TEXT]["sha256"], "dataset": header[C.S_TEXT].get("dataset"),
            "samples": header["samples"], "seq_len": header["seq_len"],
            "token_ids": hashlib.sha256(json.dumps(seqs, separators=(",", ":")).encode()).hexdigest(),
            "schedule": list(schedule), "batch_size": header["batch_size"],
            "accumulate_dtype": header["accumulate_dtype"], "compute_dtype": header["compute_dtype"],
            "device": header["device"], "sequential": header.get("sequential"), "threads": torch.get_num_threads() if cpu else None}


def add_block(manifest: dict, entry: dict) -> None:
    """Enter one finished block run (a journal entry) in the manifest: its file, statistics and weights."""
    manifest[C.M_FILES][entry["file"]] = entry["record"]
    manifest[C.S_STATISTICS].update(entry["statistics"])
    manifest[C.S_WEIGHTS].update(entry["weights"])


class CalibrationJournal:
    """`lplr_calibration_progress.json`: the run's fingerprint, every finished block run (its statistics file's
    sha256 and its manifest entries), and the checkpoint of the hidden states after the last one. Rewritten (fsync,
    rename) after each block run; removed with the checkpoint when the run completes."""

    def __init__(self, out: Path, fingerprint: dict, blocks: list[dict] | None = None, hidden: dict | None = None):
        self.out, self.path, self.fingerprint = out, out / C.CALIB_PROGRESS, fingerprint
        self.blocks: list[dict] = list(blocks or [])
        self.hidden = hidden  # {"file", "sha256", "bytes"} of the checkpoint after len(blocks) runs, or None

    def save(self) -> None:
        write_json_atomic(self.path, {"fingerprint": self.fingerprint, "blocks": self.blocks, "hidden": self.hidden},
                          indent=None)

    def finished(self, entry: dict, hidden: list[torch.Tensor] | None) -> None:
        """Record a finished block run whose statistics file is on disk: the hidden states feeding the next run (None
        after the last) are checkpointed under a new name, then the journal names both; the previous checkpoint goes
        last, so a kill at any point leaves a journal whose files are on disk."""
        before, self.hidden = self.hidden, None
        if hidden is not None:
            name = C.CALIB_HIDDEN_TEMPLATE.format(runs=len(self.blocks) + 1)
            keyed = [(C.CALIB_HIDDEN_KEY.format(batch=j), h) for j, h in enumerate(hidden)]
            self.hidden = {"file": name, **write_tensors_atomic(self.out / name, keyed, _METADATA)}
        self.blocks.append(entry)
        self.save()
        if before is not None:
            (self.out / before["file"]).unlink(missing_ok=True)

    def close(self) -> None:
        """The run is complete (its manifest written): the checkpoint and the journal go."""
        if self.hidden is not None:
            (self.out / self.hidden["file"]).unlink(missing_ok=True)
        self.path.unlink(missing_ok=True)



def _malformed(doc: dict) -> bool:
    """Whether a journal's entries are not what `CalibrationJournal` writes (files named by the STATS patterns)."""
    blocks, hidden = doc["blocks"], doc["hidden"]
    if not isinstance(blocks, list) or not all(isinstance(b, dict) and _STATS_FILE.fullmatch(str(b.get("file")))
                                               and all(isinstance(b.get(k), dict) for k in _ENTRY) for b in blocks):
        return True
    return hidden is not None and (not isinstance(hidden, dict)
                                   or hidden.get("file") != C.CALIB_HIDDEN_TEMPLATE.format(runs=len(blocks)))


def resume_journal(out: Path, fingerprint: dict, runs: int) -> CalibrationJournal:
    """The journal of the interrupted run in `out` (a fresh one when there is none), its fingerprint checked against
    this run's, its statistics files and hidden-state checkpoint checked by sha256; every other file there is
    removed (`stats_output` has checked that `out` holds nothing but that run's files). Only the hidden states after
    the last finished block run are kept, so a damaged or missing file means starting from the first block."""
    path = out / C.CALIB_PROGRESS
    if not path.is_file():
        return CalibrationJournal(out, fingerprint)
    doc = read_journal(path, ("blocks", "hidden"))
    if _malformed(doc):
        raise LplrError(f"{path} is damaged; start again with {opt('overwrite')}")
    check_fingerprint(out, doc["fingerprint"], fingerprint, _FIRST, _TOLD)
    blocks, hidden = doc["blocks"], doc["hidden"]
    bad = next((b["file"] for b in blocks if not is_intact(out / b["file"], b["record"])), None)
    if bad is None and 0 < len(blocks) < runs and (hidden is None or not is_intact(out / hidden["file"], hidden)):
        bad = "the hidden-state checkpoint" if hidden is None else hidden["file"]
    if bad is not None:
        logger.warning(f"{bad} is missing or damaged; the hidden states that fed the blocks before it are not kept, "
                       f"so every block is redone")
        blocks, hidden = [], None
    remove_except(out, {b["file"] for b in blocks} | ({hidden["file"]} if hidden else set()) | {C.CALIB_PROGRESS})
    logger.info(f"resuming: {len(blocks)} of {runs} block run(s) kept")
    return CalibrationJournal(out, fingerprint, blocks, hidden)


def load_hidden(out: Path, journal: CalibrationJournal, hidden: list[torch.Tensor]) -> None:
    """Replace `hidden` (the capture's block inputs, one per batch) in place by the checkpointed hidden states, each
    checked to have the shape and dtype of the tensor it replaces and moved to its device."""
    from safetensors import safe_open

    path = out / journal.hidden["file"]
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        for j, h in enumerate(hidden):
            key = C.CALIB_HIDDEN_KEY.format(batch=j)
            t = f.get_tensor(key) if key in keys else None
            if t is None or t.shape != h.shape or t.dtype != h.dtype:
                raise LplrError(f"{path} does not hold this run's hidden states ({key}); start again with "
                                f"{opt('overwrite')}")
            hidden[j] = t.to(h.device)
