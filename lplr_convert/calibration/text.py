"""Calibration text: reading a .txt/.jsonl file (or the bundled default) and turning it into token batches.

Encoders get one line per sample (truncated at seq_len, with the tokenizer's special tokens). Causal LMs get the
lines joined into one token stream (EOS, else SEP, else a newline between lines) cut into seq_len-token chunks, each
opened by the tokenizer's BOS token when it adds one: every position of the context window is then calibrated, and
no token is spent on padding except in the last, shorter chunk.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LplrError
from ..io.manifest import sha256_file

__all__ = ["DEFAULT_TEXT", "Batch", "CalibrationText", "load_tokenizer", "make_batches", "read_text", "tokenize"]

DEFAULT_TEXT = Path(__file__).resolve().parent.parent / "data" / "calibration_text.txt"
_JSONL = (".jsonl", ".ndjson")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json",
                    "spiece.model", "merges.txt", "sentencepiece.bpe.model")


@dataclass(frozen=True)
class CalibrationText:
    lines: list[str]
    source: str  # the file's path, or "lplr_convert/data/calibration_text.txt" for the bundled default
    sha256: str


@dataclass(frozen=True)
class Batch:
    """Right-padded token ids and their attention mask (1 = real token), both (batch, seq) int64."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())


def _jsonl_lines(path: Path, raw: list[str]) -> list[str]:
    out = []
    for i, line in enumerate(raw, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            why = "nested too deeply" if isinstance(e, RecursionError) else e.msg
            raise LplrError(f"line {i} of {path} is not valid JSON ({why}); give one {{\"text\": ...}} object per "
                            f"line") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
            raise LplrError(f"line {i} of {path} has no string field 'text'; give one {{\"text\": ...}} object per "
                            f"line")
        out.append(rec["text"])
    return out


def read_text(path: str | Path | None = None) -> CalibrationText:
    """The calibration lines of a .txt file (one sample per line) or .jsonl file (a `text` field per line); blank
    lines are skipped. None reads the text bundled with the package."""
    p = DEFAULT_TEXT if path is None else Path(path).expanduser()
    label = "lplr_convert/data/calibration_text.txt" if path is None else str(p)
    if not p.is_file():
        raise LplrError(f"calibration text {p} does not exist; pass a .txt file (one sample per line) or a .jsonl "
                        f"file with a 'text' field per line")
    try:
        raw = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise LplrError(f"calibration text {p} cannot be read as UTF-8 ({e}); save it as UTF-8 text") from None
    lines = _jsonl_lines(p, raw) if p.suffix.lower() in _JSONL else raw
    lines = [s.strip() for s in lines if s.strip()]
    if not lines:
        raise LplrError(f"calibration text {p} has no usable line (it is empty or blank); give at least one "
                        f"non-empty sample per line")
    return CalibrationText(lines, label, sha256_file(p))


def load_tokenizer(root: Path):
    """The checkpoint's own tokenizer, from its local files only."""
    from transformers import AutoTokenizer

    if not any((root / name).is_file() for name in _TOKENIZER_FILES) and not any(root.glob("*.tiktoken")):
        raise LplrError(f"{root} has no tokenizer files ({', '.join(_TOKENIZER_FILES[:3])}, ...); copy the model's "
                        f"tokenizer files into it")
    try:
        tok = AutoTokenizer.from_pretrained(str(root), local_files_only=True)
    except Exception as e:  # noqa: BLE001  (OSError, ValueError, ... from any tokenizer backend)
        why = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise LplrError(f"{root} has no usable tokenizer ({why}); copy the model's tokenizer files "
                        f"(tokenizer.json, tokenizer_config.json, ...) into it") from None
    if tok is None or not callable(tok):
        raise LplrError(f"{root} has no usable tokenizer; copy the model's tokenizer files into it")
    return tok


def _causal_chunks(tokenizer, lines: list[str], samples: int, seq_len: int) -> list[list[int]]:
    """Lines joined by EOS (else SEP, else a newline) into one stream, cut into seq_len chunks; BOS opens each chunk when the
    tokenizer adds one."""
    bos = tokenizer.bos_token_id
    ids = tokenizer("x")["input_ids"]
    lead = [bos] if bos is not None and ids and ids[0] == bos else []
    end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    sep = [end] if end is not None else tokenizer("\n", add_special_tokens=False)["input_ids"]
    width = seq_len - len(lead)
    chunks, stream = [], []
    for line in lines:
        stream += tokenizer(line, add_special_tokens=False)["input_ids"] + sep
        while len(stream) >= width and len(chunks) < samples:
            chunks.append(lead + stream[:width])
            stream = stream[width:]
        if len(chunks) == samples:
            return chunks
    if stream:
        chunks.append(lead + stream[:width])
    return chunks


def tokenize(tokenizer, lines: list[str], causal: bool, samples: int, seq_len: int) -> list[list[int]]:
    """At most `samples` token sequences of at most seq_len tokens (see the module docstring for the packing)."""
    if causal:
        seqs = _causal_chunks(tokenizer, lines, samples, seq_len)
    else:
        seqs = [tokenizer(line, truncation=True, max_length=seq_len)["input_ids"] for line in lines[:samples]]
    seqs = [s for s in seqs if s]
    if not seqs:
        raise LplrError("the calibration text gives no tokens with this tokenizer; pass a text in the model's "
                        "language")
    return seqs


def make_batches(seqs: list[list[int]], batch_size: int, pad_id: int | None, device: str | torch.device = "cpu"
                 ) -> list[Batch]:
    """Consecutive groups of `batch_size` sequences, right-padded to the longest of each group."""
    pad = 0 if pad_id is None else int(pad_id)
    out = []
    for start in range(0, len(seqs), batch_size):
        group = seqs[start:start + batch_size]
        width = max(len(s) for s in group)
        ids = torch.full((len(group), width), pad, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, s in enumerate(group):
            ids[row, :len(s)] = torch.tensor(s, dtype=torch.long)
            mask[row, :len(s)] = 1
        out.append(Batch(ids.to(device), mask.to(device)))
    return out
