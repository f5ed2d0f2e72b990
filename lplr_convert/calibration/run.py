"""`calibrate`: input second moments H = E[x x^T] of every block linear, computed one transformer block at a time.

Peak memory: one materialised block, the hidden states of the calibration set (samples x seq_len x hidden in the
compute dtype, replaced in place batch by batch), and the statistics of the block being accumulated; finished
blocks' statistics are on disk. After each block those hidden states are checkpointed for `--resume` straight from
their memory (`resume.CalibrationJournal`), with no copy. Sequential calibration (`sequential=`) holds a second copy
of the hidden states (the block's inputs, run again through the block with its transformed weights).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from loguru import logger
from tqdm import tqdm

from .. import __version__
from .. import constants as C
from ..devices import resolve_device
from ..dtypes import dtype_name
from ..errors import LplrError, opt
from ..hf.modeling import max_tokens
from ..io.outdir import output_path, resumable_when_full
from ..io.reader import open_source
from .capture import (
    Skeleton,
    build_skeleton,
    hidden_of,
    output_form,
    record_calls,
    release_outside,
    return_freed_memory,
)
from .coverage import warn_thin_statistics
from .moments import InputMoments, linear_types
from .resume import CalibrationJournal, add_block, fingerprint, load_hidden, resume_journal
from .stats import check_stats_output, save_block, source_files, stats_output, write_manifest
from .text import Batch, CalibrationText, default_text, load_tokenizer, make_batches, read_dataset, read_text, tokenize

__all__ = ["BlockTransform", "calibrate"]

ACCUMULATE_DTYPES = (torch.float32, torch.float64)


def _check_options(samples: int, seq_len: int, batch_size: int, accumulate_dtype, compute_dtype,
                   device) -> torch.device:
    """Raises LplrError for a bad option; returns the device to run on (`auto`: the GPU when there is one)."""
    device = resolve_device(device)
    for label, value, least in (("samples", samples, 1), ("seq_len", seq_len, 2), ("batch_size", batch_size, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise LplrError(f"{opt(label)} must be an integer >= {least}, got {value!r}")
    if accumulate_dtype not in ACCUMULATE_DTYPES:
        raise LplrError(f"{opt('accumulate_dtype')} {accumulate_dtype} is not supported; use float32 or float64")
    if compute_dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise LplrError(f"{opt('compute_dtype')} {compute_dtype} is not supported; use float32, float64, bfloat16 or "
                        f"float16")
    return device


def _max_positions(model, seq_len: int) -> int:
    limit = max_tokens(model)
    if limit is not None and limit < seq_len:
        logger.warning(f"seq_len {seq_len} exceeds the model's {limit} positions; using {limit}")
        return limit
    return seq_len


def _run_block(sk: Skeleton, i: int, block, positions: list[int], batches: list[Batch], hidden: list, calls: list,
               dtype) -> InputMoments:
    """Run block i for each of its calls (`positions` in the schedule) on every batch, replacing `hidden` by its
    outputs; returns the hooks with their moments (accumulated over all calls: a block the forward runs several
    times, like ALBERT's shared layer group, gets the second moment of all the inputs its weights see)."""
    with InputMoments(block, f"{sk.blocks_name}.{i}", dtype) as moments:
        for k in positions:
            for j, batch in enumerate(batches):
                moments.start_batch(batch.attention_mask)
                # contiguous (a no-op for the families tested): the layout of a checkpoint reloaded on resume
                hidden[j] = hidden_of(calls[j][k].run(block, hidden[j])).contiguous()
    return moments


def _runs(schedule: list[int]) -> list[tuple[int, list[int]]]:
    """(block, positions of its consecutive calls) in the order the forward runs them."""
    out: list[tuple[int, list[int]]] = []
    for k, b in enumerate(schedule):
        if out and out[-1][0] == b:
            out[-1][1].append(k)
        else:
            out.append((b, [k]))
    return out


def _block_stats(sk: Skeleton, moments: InputMoments, store_dtype) -> tuple[dict, dict, dict]:
    """(tensors to save, statistics records, weight records) of one block, named by checkpoint names."""
    tensors, stats, weights = {}, {}, {}
    for m in moments.moments.values():
        names = [sk.to_ckpt[f"{name}.weight"] for name in m.members]
        key = f"{names[0].removesuffix('.weight')}.{C.CALIB_KEY_SUFFIX}"
        tensors[key] = m.sum.div_(max(m.tokens, 1)).to(store_dtype)  # in place: no second copy of the sums
        shape = list(m.sum.shape)
        stats[key] = {"shape": shape, "tokens": m.tokens, "weights": names}
        weights.update({n: {"statistic": key, "shape": shape} for n in names})
    missing = sorted(set(moments.linears) - set(moments.leader))
    if missing:
        logger.warning(f"{len(missing)} linear(s) never ran on the calibration text (first: {missing[0]}); they get "
                       f"no statistic")
    return tensors, stats, weights


class BlockTransform(Protocol):
    """Sequential calibration: what replaces a block's weights once its statistics are measured, before its outputs
    feed the next block. `record` (JSON) goes into the manifest and the resume fingerprint."""

    record: dict

    def __call__(self, weights: dict[str, torch.Tensor], statistics: dict[str, torch.Tensor]
                 ) -> dict[str, torch.Tensor]:
        """New values of (some of) `weights` (checkpoint name -> the block's weight), given each one's statistic H."""
        ...


def _propagate_transformed(sk: Skeleton, i: int, block, positions: list[int], inputs: list, hidden: list,
                           calls: list, tensors: dict, stats: dict, transform: BlockTransform) -> None:
    """Replace block i's linear weights by `transform`'s values (given the statistics just measured) and run the
    block again on its `inputs`: `hidden` becomes the outputs of the transformed block (the inputs of the next)."""
    H = {name: tensors[key] for key, rec in stats.items() for name in rec["weights"]}
    prefix = f"{sk.blocks_name}.{i}."
    params = {sk.to_ckpt[f"{prefix}{n}.weight"]: m.weight for n, m in block.named_modules()
              if isinstance(m, linear_types()) and f"{prefix}{n}.weight" in sk.to_ckpt}
    new = transform({n: w.detach() for n, w in params.items() if n in H}, {n: H[n] for n in params if n in H})
    for name, value in new.items():
        params[name].data.copy_(value.to(params[name].dtype).reshape(params[name].shape))
    for j, h in enumerate(inputs):
        for k in positions:
            h = hidden_of(calls[j][k].run(block, h)).contiguous()
        hidden[j] = h


def _materialise(sk: Skeleton, i: int):
    block = sk.blocks[i]
    sk.load(block, f"{sk.blocks_name}.{i}")
    return block


def _capture(sk: Skeleton, batches: list[Batch]) -> tuple[list, list]:
    """The first block call's inputs and every recorded block call, for each batch; sets `sk.schedule` (the block
    of each call, the same for every batch). The first block called is left materialised."""
    h0, first = record_calls(sk, batches[0])
    form = output_form(first[0].run(_materialise(sk, first[0].block), h0))
    del h0, first
    hidden, calls = [], []
    for batch in batches:
        h, c = record_calls(sk, batch, form)
        hidden.append(h)
        calls.append(c)
    schedules = {tuple(call.block for call in c) for c in calls}
    if len(schedules) > 1:
        raise LplrError(f"{type(sk.model).__name__}'s forward calls its blocks in another order for another batch; "
                        f"calibrate needs one order")
    sk.schedule = list(schedules.pop())
    release_outside(sk)
    return hidden, calls


def _check_enough(text: CalibrationText, seqs: list[list[int]], causal: bool, samples: int, seq_len: int) -> None:
    """A dataset must give what was asked (`samples` samples; for a causal LM, each of seq_len tokens): one line
    otherwise. A text file that gives less is used as it is, with a warning saying what is used (and the manifest
    records it: samples, tokens, longest_sample)."""
    tokens = sum(len(s) for s in seqs)
    full = len(seqs) >= samples and (not causal or all(len(s) == seq_len for s in seqs[:samples]))
    if full:
        return
    got = (f"{len(seqs)} sample(s) of at most {max(len(s) for s in seqs)} tokens ({tokens} tokens)" if causal
           else f"{len(seqs)} sample(s) ({tokens} tokens)")
    asked = f"{samples} samples of {seq_len} tokens" if causal else f"{samples} samples"
    if text.dataset is not None:
        raise LplrError(f"dataset {text.source} (column {text.dataset['column']!r}) gives {got}, fewer than the "
                        f"{asked} asked; pass a larger split or dataset, or lower {opt('samples')} or "
                        f"{opt('seq_len')}")
    short = causal and len(seqs) == 1 and len(seqs[0]) < seq_len
    logger.warning(f"the calibration text {text.source} gives {got}, not {asked}"
                   + (f" (the whole text is shorter than seq_len {seq_len})" if short else "")
                   + "; using what it gives (pass a longer calibration text for more)")


def _header(in_path, src, sk: Skeleton, text, seqs, samples, seq_len, batch_size, acc, compute, store) -> dict:
    config = src.config or {}
    return {
        C.M_FORMAT_VERSION: C.CALIB_FORMAT_VERSION, C.S_KIND: C.CALIB_KIND, C.M_TOOL: C.TOOL_NAME,
        C.M_TOOL_VERSION: __version__, C.M_COMPLETE: True,
        C.M_SOURCE: {"path": str(in_path), "root": str(src.root), "repo_id": src.repo_id, "commit": src.commit,
                     "model_type": config.get("model_type"), "architecture": type(sk.model).__name__,
                     C.M_FILES: source_files(src)},
        C.S_TEXT: {"source": text.source, "sha256": text.sha256, "lines": len(text.lines),
                   "packing": "chunks" if sk.causal else "lines",
                   **({"dataset": text.dataset} if text.dataset is not None else {})},
        "samples": len(seqs), "samples_requested": samples, "tokens": sum(len(s) for s in seqs), "seq_len": seq_len,
        "longest_sample": max(len(s) for s in seqs), "shortest_sample": min(len(s) for s in seqs),
        "batch_size": batch_size, "dtype": dtype_name(store), "accumulate_dtype": dtype_name(acc),
        "compute_dtype": dtype_name(compute), "device": str(sk.device), "block_stack": sk.blocks_name,
        "blocks": len(sk.blocks),
    }


def _restart(out: Path, sk: Skeleton, runs: list[tuple[int, list[int]]], hidden: list,
             journal: CalibrationJournal) -> None:
    """Skip the block runs an interrupted run finished (`journal.blocks`): their blocks are freed (the capture
    materialised the first one) and, when runs remain, `hidden` becomes the checkpoint of the hidden states after
    the last finished one."""
    done = len(journal.blocks)
    for i, _ in runs[:done]:
        sk.blocks[i] = torch.nn.Module()
    return_freed_memory()
    if 0 < done < len(runs):
        load_hidden(out, journal, hidden)


def _write_stats(out: Path, sk: Skeleton, batches: list[Batch], hidden: list, calls: list, manifest: dict,
                 accumulate_dtype, journal: CalibrationJournal, transform: BlockTransform | None = None,
                 finish=None) -> None:
    """Run the blocks in the order the model calls them (`_runs`), from where `journal` left off, saving each block's
    statistics and journaling it with the hidden states that feed the next, then the manifest (last). With a
    `transform` (sequential calibration) the next block is fed the outputs of this block with its weights
    transformed (`_propagate_transformed`), not of the original block. `finish(manifest)` runs after the last block,
    before the manifest is written."""
    manifest.update({C.M_FILES: {}, C.S_STATISTICS: {}, C.S_WEIGHTS: {}})
    for entry in journal.blocks:
        add_block(manifest, entry)
    runs, done = _runs(sk.schedule), len(journal.blocks)
    _restart(out, sk, runs, hidden, journal)
    with torch.no_grad():
        for n, (i, positions) in enumerate(tqdm(runs[done:], desc="calibrating", unit="block", total=len(runs),
                                                initial=done), start=done + 1):
            block = _materialise(sk, i)  # loads only what is not loaded yet (the first block called is)
            inputs = None if transform is None else [h.clone() for h in hidden]
            moments = _run_block(sk, i, block, positions, batches, hidden, calls, accumulate_dtype)
            if transform is None:
                sk.blocks[i] = torch.nn.Module()  # the block's weights go with it
                del block
            tensors, stats, weights = _block_stats(sk, moments, accumulate_dtype)
            del moments
            if transform is not None:
                _propagate_transformed(sk, i, block, positions, inputs, hidden, calls, tensors, stats, transform)
                sk.blocks[i] = torch.nn.Module()
                del block, inputs
            file, record = save_block(out, i, tensors)
            del tensors
            return_freed_memory()
            entry = {"file": file, "record": record, "statistics": {k: {"file": file, **v} for k, v in stats.items()},
                     "weights": weights}
            add_block(manifest, entry)
            journal.finished(entry, hidden if n < len(runs) else None)
    if finish is not None:
        hidden.clear()
        return_freed_memory()
        finish(manifest)
    write_manifest(out, manifest)
    journal.close()


def _add_sensitivity(out: Path, root: Path, sk: Skeleton, seqs: list[list[int]], manifest: dict) -> None:
    """Measure and store the output sensitivity of the weights that have statistics; record it in `manifest`."""
    from .sensitivity import measure_sensitivity, save_sensitivity

    sens, tokens = measure_sensitivity(Path(root), seqs, sk.to_ckpt, set(manifest[C.S_WEIGHTS]), sk.device)
    manifest[C.M_FILES][C.CALIB_SENSITIVITY_FILE] = save_sensitivity(out, sens)
    manifest[C.S_SENSITIVITY] = {"file": C.CALIB_SENSITIVITY_FILE, "samples": len(seqs), "tokens": tokens,
                                 "weights": len(sens),
                                 "estimate": "mean squared gradient of the summed next-token cross-entropy per "
                                             "output channel (empirical Fisher diagonal), float32 model"}


def calibrate(in_path: str | Path, out_path: str | Path, *, text: str | Path | None = None,
              dataset: str | None = None, text_column: str | None = None, samples: int = 128,
              seq_len: int = 512, batch_size: int = 8, device: str = "auto",
              accumulate_dtype: torch.dtype = torch.float32, compute_dtype: torch.dtype = torch.float32,
              overwrite: bool = False, resume: bool = False, sequential: BlockTransform | None = None,
              sensitivity_samples: int = 0) -> dict:
    """Write the input second moments E[x x^T] of every linear in every block of `in_path` to the STATS directory
    `out_path` and return its manifest.

    The forward runs in `compute_dtype` on `device` (auto: the GPU when there is one; the manifest records the one
    used), one block at a time; x x^T is summed over the non-padding tokens in `accumulate_dtype` (float32 or
    float64), divided by the token count, and stored in that dtype. Linears fed the same input tensor share one
    statistic. `text` is a .txt (a sample per line) or .jsonl (`text` field) file, either may be gzip-compressed;
    `dataset` is NAME[:CONFIG][:SPLIT] read with the `datasets` library (a local directory or a Hub id; the column
    `text_column`, else 'text', else the only string column), and must give `samples` full samples; with neither,
    the text bundled with the package (`text.default_text`: sentences for an encoder, sentences and public-domain
    books for a causal LM). The manifest's `text` records what was used.

    `sequential` (a `BlockTransform`, e.g. `pipeline.sequential.CompressedBlocks`): each block's statistics are
    taken from the outputs of the blocks before it with their weights transformed (compressed, then decoded), as
    llm-compressor's sequential pipeline does; the manifest's `sequential` records the transform.

    `sensitivity_samples` > 0 (causal LMs): after the statistics, the whole float model runs forward and backward on
    the first that many calibration samples and each block linear's output sensitivity (`sensitivity`: the mean
    squared gradient of the next-token loss per output channel) is stored beside them; a budget then weighs each
    tensor's error by it (`pipeline.allocation`). The manifest's `sensitivity` records it.

    `resume` continues an interrupted run in `out_path` with the same inputs and settings (any change refused,
    naming it): the blocks it finished, checked by sha256, are kept, the rest run from its checkpoint of the hidden
    states, and the result is byte-identical to an uninterrupted run.
    """
    if overwrite and resume:
        raise LplrError(f"{opt('overwrite')} and {opt('resume')} contradict each other; pass one of them")
    device = _check_options(samples, seq_len, batch_size, accumulate_dtype, compute_dtype, device)
    if not isinstance(sensitivity_samples, int) or isinstance(sensitivity_samples, bool) or sensitivity_samples < 0:
        raise LplrError(f"{opt('sensitivity_samples')} must be an integer >= 0, got {sensitivity_samples!r}")
    src = open_source(str(in_path))
    out = output_path(out_path)
    check_stats_output(out, src.root, overwrite, resume)  # before hashing the source and running its embeddings
    if text is not None and dataset is not None:
        raise LplrError(f"{opt('text')} and {opt('dataset')} are two sources of calibration text; pass one of them")
    if text_column is not None and dataset is None:
        raise LplrError(f"{opt('text_column')} names a column of {opt('dataset')}; pass a dataset, or drop it")
    # a bad text or dataset is refused before the model is read
    cal_text = read_dataset(dataset, text_column) if dataset is not None else read_text(text) if text else None
    sk = build_skeleton(src, device, compute_dtype)
    if sensitivity_samples and not sk.causal:
        raise LplrError(f"{opt('sensitivity_samples')} measures the next-token loss of a causal LM; "
                        f"{type(sk.model).__name__} is not one: calibrate without it")
    cal_text = default_text(sk.causal) if cal_text is None else cal_text
    tokenizer = load_tokenizer(src.root)
    seq_len = _max_positions(sk.model, seq_len)
    seqs = tokenize(tokenizer, cal_text.lines, sk.causal, samples, seq_len)
    _check_enough(cal_text, seqs, sk.causal, samples, seq_len)
    manifest = _header(in_path, src, sk, cal_text, seqs, samples, seq_len, batch_size, accumulate_dtype,
                       compute_dtype, accumulate_dtype)
    manifest["sequential"] = None if sequential is None else sequential.record
    manifest["sensitivity_samples"] = min(sensitivity_samples, len(seqs))
    batches = make_batches(seqs, batch_size, tokenizer.pad_token_id, sk.device)
    with torch.no_grad():
        hidden, calls = _capture(sk, batches)  # an architecture it cannot run is refused before anything is written
    with stats_output(out, src.root, overwrite, resume), resumable_when_full(out, C.CALIB_MANIFEST):
        stamp = fingerprint(manifest, src.config, seqs, sk.schedule)
        journal = resume_journal(out, stamp, len(_runs(sk.schedule))) if resume else CalibrationJournal(out, stamp)
        journal.save()
        finish = None
        if sensitivity_samples:
            def finish(m: dict) -> None:
                _add_sensitivity(out, src.root, sk, seqs[:sensitivity_samples], m)
        _write_stats(out, sk, batches, hidden, calls, manifest, accumulate_dtype, journal, sequential, finish)
    warn_thin_statistics(manifest[C.S_STATISTICS], str(out))
    logger.info(f"wrote {len(manifest[C.S_STATISTICS])} statistics for {len(manifest[C.S_WEIGHTS])} weights of "
                f"{len(sk.blocks)} blocks to {out}")
    return manifest
