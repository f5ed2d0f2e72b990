"""Calibration text: reading a .txt/.jsonl file, a dataset (`datasets` library) or the bundled default, and turning
it into token batches.

Encoders get one line (a dataset: one row) per sample (truncated at seq_len, with the tokenizer's special tokens).
Causal LMs get the lines joined into one token stream (EOS, else SEP, else a newline between lines) cut into
seq_len-token chunks, each opened by the tokenizer's BOS token when it adds one: every position of the context window
is then calibrated, and no token is spent on padding except in the last, shorter chunk.

The bundled default (`default_text`): encoders get `data/calibration_text.txt` (560 varied one-sentence samples);
causal LMs get those sentences followed by `data/calibration_books.jsonl.gz`, passages of public-domain books
(data/CALIBRATION_SOURCES.md: about 311k SmolLM2 tokens), so that 128 samples of 512 tokens come in full.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LplrError, opt
from ..io.manifest import sha256_file

__all__ = ["DEFAULT_BOOKS", "DEFAULT_TEXT", "Batch", "CalibrationText", "default_text", "load_tokenizer",
           "make_batches", "parse_dataset", "read_dataset", "read_text", "tokenize"]

DEFAULT_TEXT = Path(__file__).resolve().parent.parent / "data" / "calibration_text.txt"
DEFAULT_BOOKS = DEFAULT_TEXT.parent / "calibration_books.jsonl.gz"
_JSONL = (".jsonl", ".ndjson")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json",
                    "spiece.model", "merges.txt", "sentencepiece.bpe.model")


@dataclass(frozen=True)
class CalibrationText:
    lines: Sequence[str]  # a list, or a dataset's rows read as they are needed (`_Rows`)
    source: str  # the file's path, "lplr_convert/data/..." for the bundled default, or the --dataset given
    sha256: str | None  # of the file(s) read; of a local dataset's files; None for a Hub dataset
    dataset: dict | None = None  # name, config, split, column, rows, fingerprint, version of a --dataset


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


def _raw_lines(p: Path) -> list[str]:
    try:
        if p.suffix.lower() == ".gz":
            with gzip.open(p, "rt", encoding="utf-8") as f:
                return f.read().splitlines()
        return p.read_text(encoding="utf-8").splitlines()
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise LplrError(f"calibration text {p} cannot be read as UTF-8 (gzip-compressed when it ends in .gz) ({e}); "
                        f"save it as UTF-8 text") from None


def read_text(path: str | Path | None = None) -> CalibrationText:
    """The calibration lines of a .txt file (one sample per line) or .jsonl file (a `text` field per line), either
    gzip-compressed when its name ends in .gz; blank lines are skipped. None reads the bundled sentences
    (data/calibration_text.txt, the encoders' default: see `default_text`)."""
    p = DEFAULT_TEXT if path is None else Path(path).expanduser()
    label = "lplr_convert/data/calibration_text.txt" if path is None else str(p)
    if not p.is_file():
        raise LplrError(f"calibration text {p} does not exist; pass a .txt file (one sample per line) or a .jsonl "
                        f"file with a 'text' field per line")
    raw = _raw_lines(p)
    inner = p.suffixes[-2] if p.suffix.lower() == ".gz" and len(p.suffixes) > 1 else p.suffix
    lines = _jsonl_lines(p, raw) if inner.lower() in _JSONL else raw
    lines = [s.strip() for s in lines if s.strip()]
    if not lines:
        raise LplrError(f"calibration text {p} has no usable line (it is empty or blank); give at least one "
                        f"non-empty sample per line")
    return CalibrationText(lines, label, sha256_file(p))


def default_text(causal: bool) -> CalibrationText:
    """The text calibrate uses without --text/--dataset: the bundled sentences for an encoder (a sample each); for a
    causal LM, those sentences followed by the bundled public-domain book passages, enough for 128 samples of 512
    tokens with any common tokenizer."""
    sentences = read_text()
    if not causal:
        return sentences
    books = read_text(DEFAULT_BOOKS)
    both = hashlib.sha256(f"{sentences.sha256}\n{books.sha256}".encode()).hexdigest()
    return CalibrationText([*sentences.lines, *books.lines], f"{sentences.source} + lplr_convert/data/"
                           f"{DEFAULT_BOOKS.name}", both)


# NAME[:CONFIG][:SPLIT], the colons inside a split's slice (train[:1000]) excepted
_SPEC = re.compile(r":(?![^\[]*\])")
_LOCAL_SAVED = ("dataset_info.json", "state.json", "dataset_dict.json")


def parse_dataset(spec: str) -> tuple[str, str | None, str | None]:
    """(name, config, split) of NAME[:CONFIG][:SPLIT]; an empty part is None (NAME::SPLIT: no config). A NAME that is
    an existing path is taken whole, colons included."""
    if Path(spec).expanduser().exists():
        return str(Path(spec).expanduser()), None, None
    parts = _SPEC.split(spec)
    if len(parts) > 3 or not parts[0].strip():
        raise LplrError(f"{opt('dataset')} {spec!r} is not NAME[:CONFIG][:SPLIT]; pass e.g. wikitext:wikitext-2-raw-v1:"
                        f"train, ./my_dataset or ./my_dataset::validation")
    parts += [""] * (3 - len(parts))
    return parts[0].strip(), parts[1].strip() or None, parts[2].strip() or None


class _Rows(Sequence):
    """The non-blank strings of one column of a datasets.Dataset, stripped, read in order only as far as they are
    needed (a Hub corpus of millions of rows is not materialised); len() is the dataset's row count."""

    def __init__(self, ds, column: str):
        self.ds, self.column = ds, column

    def __len__(self) -> int:
        return self.ds.num_rows

    def __iter__(self) -> Iterator[str]:
        for batch in self.ds.select_columns([self.column]).iter(batch_size=256):
            for value in batch[self.column]:
                if isinstance(value, str) and value.strip():
                    yield value.strip()

    def __getitem__(self, index):
        if isinstance(index, slice):
            return list(itertools.islice(self, index.start, index.stop, index.step))
        for value in itertools.islice(self, index, None):
            return value
        raise IndexError(f"row {index} of {len(self)} (blank rows skipped)")


def _text_column(ds, label: str, column: str | None) -> str:
    strings = [n for n, f in ds.features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
    if column is not None:
        if column not in ds.features:
            raise LplrError(f"dataset {label} has no column {column!r} (columns: {', '.join(ds.features)}); pass "
                            f"{opt('text_column')} with one of them")
        if column not in strings:
            raise LplrError(f"column {column!r} of dataset {label} holds {ds.features[column]}, not text; pass "
                            f"{opt('text_column')} naming a string column ({', '.join(strings) or 'none'})")
        return column
    if "text" in strings:
        return "text"
    if len(strings) == 1:
        return strings[0]
    raise LplrError(f"dataset {label} has {'no text column' if not strings else 'several text columns'} (columns: "
                    f"{', '.join(f'{n} ({ds.features[n]})' for n in ds.features) or 'none'}); pass "
                    f"{opt('text_column')} naming the column to calibrate on")


def _choose_split(names: list[str], split: str | None, label: str) -> str:
    """The split asked for, else 'train', else the only split; one line naming the splits otherwise."""
    chosen = split or ("train" if "train" in names else names[0] if len(names) == 1 else None)
    if chosen is None:
        raise LplrError(f"dataset {label} has several splits ({', '.join(names)}) and none is 'train'; name one: "
                        f"{opt('dataset')} NAME:CONFIG:SPLIT (CONFIG may be empty)")
    if chosen not in names and "[" not in chosen:  # a slice (train[:1000]) is checked by datasets
        raise LplrError(f"dataset {label} has no split {chosen!r} (splits: {', '.join(names)}); pass "
                        f"{opt('dataset')} NAME:CONFIG:SPLIT (CONFIG may be empty) with one of them")
    return chosen


def _pick_split(loaded, label: str, split: str | None):
    """(Dataset, split) out of what `load_from_disk`/`load_dataset` returned (a Dataset, or a DatasetDict)."""
    if not hasattr(loaded, "keys"):
        return loaded, split
    chosen = _choose_split(list(loaded.keys()), split, label)
    return loaded[chosen], chosen


def _local_sha256(root: Path) -> str:
    """Of every file below a local dataset directory (relative names and contents), in name order."""
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(root).as_posix()}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def _load(name: str, config: str | None, split: str | None, label: str, local: bool):
    try:
        import datasets
    except ImportError:
        raise LplrError(f"{opt('dataset')} needs the datasets package; install it with "
                        f"pip install 'lplr-convert[datasets]', or pass a .txt/.jsonl file with {opt('text')}") from None
    root = Path(name)
    try:
        if local and any((root / f).is_file() for f in _LOCAL_SAVED):  # written by save_to_disk
            if config is not None:
                raise LplrError(f"dataset {label} was saved with save_to_disk and has no configs; drop ':{config}' "
                                f"({opt('dataset')} {name}::SPLIT names a split)")
            return _pick_split(datasets.load_from_disk(str(root)), label, split)
        if local:  # every split of a local directory (cheap), then the one asked for
            return _pick_split(datasets.load_dataset(name, config), label, split)
        if split is None:  # a Hub dataset: only the split used is downloaded
            split = _choose_split(list(datasets.get_dataset_split_names(name, config)), None, label)
        return datasets.load_dataset(name, config, split=split), split
    except LplrError:
        raise
    except Exception as e:  # noqa: BLE001  (DatasetNotFoundError, FileNotFoundError, ValueError, ConnectionError ...)
        why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        where = ("a directory written by save_to_disk, or of .json/.jsonl/.parquet/.csv/.txt files" if local
                 else "a local dataset directory, or a Hub dataset id reachable from here")
        raise LplrError(f"dataset {label} cannot be loaded ({why}); pass {where}") from None


def read_dataset(spec: str, text_column: str | None = None) -> CalibrationText:
    """The rows of one text column of a dataset, through the `datasets` library (imported here only): NAME is a
    local directory (written by `save_to_disk`, or of data files `load_dataset` reads) or a Hub dataset id; SPLIT
    defaults to 'train' (else the only split); the column to `text_column`, else 'text', else the only string
    column."""
    name, config, split = parse_dataset(spec)
    path = Path(name)
    local = path.is_dir()
    if path.is_file():
        raise LplrError(f"dataset {spec} is a file; pass it with {opt('text')} (.txt or .jsonl), or give "
                        f"{opt('dataset')} the directory holding it")
    if not local and (name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1):
        raise LplrError(f"dataset {spec} does not exist (no such directory, nor a Hub id); pass a directory written "
                        f"by save_to_disk or holding .json/.jsonl/.parquet/.txt files, or a Hub id (owner/name)")
    ds, split = _load(name, config, split, spec, local)
    column = _text_column(ds, spec, text_column)
    info = {"name": str(path.resolve()) if local else name, "config": config, "split": split, "column": column,
            "rows": ds.num_rows, "fingerprint": getattr(ds, "_fingerprint", None),
            "version": str(ds.info.version) if getattr(ds.info, "version", None) else None}
    return CalibrationText(_Rows(ds, column), spec, _local_sha256(path) if local else None, info)


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


def _causal_chunks(tokenizer, lines: Sequence[str], samples: int, seq_len: int) -> list[list[int]]:
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


def tokenize(tokenizer, lines: Sequence[str], causal: bool, samples: int, seq_len: int) -> list[list[int]]:
    """At most `samples` token sequences of at most seq_len tokens (see the module docstring for the packing)."""
    if causal:
        seqs = _causal_chunks(tokenizer, lines, samples, seq_len)
    else:
        seqs = [tokenizer(line, truncation=True, max_length=seq_len)["input_ids"]
                for line in itertools.islice(lines, samples)]
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
