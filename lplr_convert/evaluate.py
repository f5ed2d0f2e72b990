"""Model-level fidelity: run the original and the converted weights on the same text and compare the outputs.

Encoders (sentence-transformers directories, or any non-causal architecture): cosine between the original and the
converted sentence embeddings, and the share of sentences whose nearest neighbour among the others is unchanged.
Causal LMs: perplexity of both and the mean per-token KL(original || converted) of the next-token distributions.
One model is built from the original directory, run, then overwritten in place with the converted weights and run
again, so only one model is resident. Offline only: the original must be a local directory.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from importlib import resources
from pathlib import Path

import torch
from loguru import logger

from . import constants as C
from .errors import LplrError, opt

__all__ = ["DEFAULT_TEXT", "KIND_CAUSAL", "KIND_ENCODER", "compare_embeddings", "evaluate", "evaluate_state_dict",
           "load_texts", "model_kind"]

DEFAULT_TEXT = "eval_sentences.txt"  # shipped in lplr_convert/data/
KIND_ENCODER = "encoder"
KIND_CAUSAL = "causal_lm"
_ST_MODULES = "modules.json"
_BATCH = 16
_MAX_LENGTH = 256
_SPILL_BYTES = 1 << 30  # keep the original model's log-probs in memory up to this size, spill to disk beyond


# ---------------------------------------------------------------------------------------------------- inputs


def load_texts(text: str | os.PathLike | list[str] | None = None, max_texts: int = 256) -> tuple[list[str], str]:
    """(texts, description): non-empty lines of a UTF-8 file, a list of strings, or the packaged sentences."""
    if max_texts < 2:
        raise LplrError(f"max_texts={max_texts} is too small; pass at least 2 texts")
    if text is None:
        lines = resources.files("lplr_convert").joinpath("data", DEFAULT_TEXT).read_text(encoding="utf-8").splitlines()
        source = f"packaged {DEFAULT_TEXT}"
    elif isinstance(text, (list, tuple)):
        lines, source = [str(t) for t in text], "list"
    else:
        path = Path(text)
        if not path.is_file():
            raise LplrError(f"{opt('text')} {path} is not a file; pass a UTF-8 text file with one sentence per line")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise LplrError(f"{opt('text')} {path} is not UTF-8 text; pass a UTF-8 file with one sentence per "
                            f"line") from None
        source = str(path.resolve())
    texts = [t.strip() for t in lines if t.strip()][:max_texts]
    if len(texts) < 2:
        raise LplrError(f"the evaluation text ({source}) has {len(texts)} non-empty line(s); give at least 2, "
                        f"one sentence per line")
    return texts, source


def model_kind(original: str | os.PathLike) -> str:
    """KIND_CAUSAL for *ForCausalLM / *LMHeadModel architectures, else KIND_ENCODER (sentence-transformers too)."""
    root = Path(original)
    if (root / _ST_MODULES).is_file():
        return KIND_ENCODER
    archs = _config(root).get("architectures") or []
    return KIND_CAUSAL if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) else KIND_ENCODER


def _config(root: Path) -> dict:
    try:
        return json.loads((root / C.CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        raise LplrError(f"{root} has no readable {C.CONFIG_FILE}; pass {opt('original')} the local directory of the "
                        f"source model") from None


def _check_original(original: str | os.PathLike) -> Path:
    root = Path(original).expanduser()
    if str(original).startswith("bundled:"):
        from .io.reader import resolve_source

        root = resolve_source(str(original))[0]
    if not root.is_dir():
        raise LplrError(f"{opt('original')} {original} is not a local directory; evaluation is offline, pass the "
                        f"source "
                        f"model's directory (download it first with `hf download`)")
    _config(root)
    return root.resolve()


# ---------------------------------------------------------------------------------------------------- weights


def _target_key(name: str, keys: set[str], prefix: str) -> str | None:
    from .hf.modeling import name_candidates

    return next((cand for cand in name_candidates(name, prefix) if cand in keys), None)


def _copy_into(own: dict[str, torch.Tensor], key: str, name: str, t: torch.Tensor) -> str:
    if tuple(own[key].shape) != tuple(t.shape):
        raise LplrError(f"{name} has shape {tuple(t.shape)} in the converted weights but {tuple(own[key].shape)} "
                        f"in the model built from {opt('original')}; pass the checkpoint that was converted")
    own[key].copy_(t.to(device=own[key].device))
    return key


@torch.no_grad()
def _overwrite_weights(module: torch.nn.Module, tensors: Iterable[tuple[str, torch.Tensor]],
                       required: set[str] | None) -> int:
    """Copy (name, tensor) pairs into the module's parameters and buffers in place; returns how many were loaded.

    Names may carry or lack the model's base prefix (e.g. "bert."). Floating-point tensors the model has no such name
    for (families transformers renames or fuses on load, e.g. per-expert MoE weights) are placed by transformers' own
    loading (`modeling.mapped_by_transformers`). Every name in `required` must land (default: every floating-point
    tensor; integer buffers such as position ids may be absent from the model).
    """
    from .hf.modeling import mapped_by_transformers

    own = module.state_dict()
    keys = set(own)
    prefix = getattr(module, "base_model_prefix", "") or ""
    must = (lambda name, t: name in required) if required is not None else (lambda name, t: t.is_floating_point())
    placed, unplaced, needed = set(), {}, False
    for name, t in tensors:
        key = _target_key(name, keys, prefix)
        if key is None:
            if t.is_floating_point() or must(name, t):
                unplaced[name] = t
                needed |= must(name, t)
            continue
        placed.add(_copy_into(own, key, name, t))
    missing = []
    if needed:  # (tensors that need not land, e.g. copied ones, are the original's already)
        mapped, missing = mapped_by_transformers(module, unplaced)
        done = {own[k].data_ptr() for k in placed}  # never overwrite what was placed by name, or a weight tied to it
        placed |= {_copy_into(own, k, k, t) for k, t in mapped.items() if own[k].data_ptr() not in done}
        missing = [n for n in missing if must(n, unplaced[n])]
    if missing:
        raise LplrError(f"{len(missing)} converted tensor(s) have no place in the model built from {opt('original')} "
                        f"(first: {missing[0]}); pass the checkpoint that was converted")
    return len(placed)


# ---------------------------------------------------------------------------------------------------- encoders


def compare_embeddings(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Cosine of each row of `a` with the same row of `b` (mean, min), and the share of rows whose nearest neighbour
    among the other rows (by cosine) is the same under both."""
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] < 2:
        raise ValueError(f"need two (n >= 2, d) embedding matrices of equal shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    a = torch.nn.functional.normalize(a.double(), dim=1)
    b = torch.nn.functional.normalize(b.double(), dim=1)
    cos = (a * b).sum(1).clamp(-1.0, 1.0)

    def neighbours(x: torch.Tensor) -> torch.Tensor:
        sim = x @ x.T
        sim.fill_diagonal_(-math.inf)
        return sim.argmax(1)

    kept = (neighbours(a) == neighbours(b)).double().mean()
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), "neighbour_kept": float(kept)}


def _max_length(model) -> int:
    """Tokens per text: at most _MAX_LENGTH, and no more than the model has positions for."""
    from .hf.modeling import max_tokens

    return min(_MAX_LENGTH, max_tokens(model) or _MAX_LENGTH)


def _built(root: Path, build):
    """What `build()` makes of the original model, or an LplrError naming the directory and why it failed."""
    try:
        return build()
    except LplrError:
        raise
    except Exception as e:  # noqa: BLE001  (OSError, ValueError, ... from transformers or sentence-transformers)
        why = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise LplrError(f"{opt('original')} {root}: the model cannot be built from it ({why}); pass the local "
                        f"directory of the checkpoint that was converted") from None


class _Encoder:
    """Sentence embeddings of a sentence-transformers directory, or mean-pooled hidden states of a plain encoder."""

    def __init__(self, root: Path, device: str):
        self.device = device
        if (root / _ST_MODULES).is_file():  # sentence-transformers loads its own tokenizer
            from sentence_transformers import SentenceTransformer

            self.st = _built(root, lambda: SentenceTransformer(str(root), device=device, local_files_only=True))
            first = self.st[0]
            self.core = getattr(first, "auto_model", None) or first.model
        else:
            from transformers import AutoModel

            from .calibration.text import load_tokenizer

            self.tokenizer = load_tokenizer(root)
            self.st = None
            self.core = _built(root, lambda: AutoModel.from_pretrained(root, local_files_only=True,
                                                                       dtype=torch.float32).to(device))
            self.max_length = _max_length(self.core)
        self.core.eval()

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> torch.Tensor:
        if self.st is not None:
            _check_ids(self.st.tokenize(texts)["input_ids"], self.core, "the sentence-transformers model")
            return self.st.encode(texts, batch_size=_BATCH, convert_to_tensor=True, show_progress_bar=False).cpu()
        out = []
        for i in range(0, len(texts), _BATCH):
            enc = self.tokenizer(texts[i:i + _BATCH], padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt").to(self.device)
            _check_ids(enc["input_ids"], self.core, "the encoder")
            hidden = self.core(**enc).last_hidden_state.float()
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out.append(((hidden * mask).sum(1) / mask.sum(1).clamp_min(1)).cpu())
        return torch.cat(out)


def _check_ids(ids: torch.Tensor, model, what: str) -> None:
    """Token ids must index the model's embedding table: a tokenizer larger than the table is a one-line error."""
    rows = model.get_input_embeddings().num_embeddings
    top = int(ids.max()) if ids.numel() else -1
    if top >= rows:
        raise LplrError(f"{what}'s tokenizer gives token id {top}, but the model's embedding table has {rows} rows; "
                        f"the tokenizer belongs to another model: put the model's own tokenizer files beside it")


# ---------------------------------------------------------------------------------------------------- causal LMs


class _CausalLM:
    def __init__(self, root: Path, device: str):
        from transformers import AutoModelForCausalLM

        from .calibration.text import load_tokenizer

        self.device = device
        self.tokenizer = load_tokenizer(root)
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token is None and self.tokenizer.eos_token is not None:
            self.tokenizer.pad_token = self.tokenizer.eos_token  # pad positions are masked out below
        self.core = _built(root, lambda: AutoModelForCausalLM.from_pretrained(root, local_files_only=True,
                                                                              dtype=torch.float32).to(device))
        self.core.eval()
        self.max_length = _max_length(self.core)

    @torch.inference_mode()
    def log_probs(self, texts: list[str]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Per batch: log-probs (tokens x vocab, float32, CPU) of each next-token prediction, and the true tokens."""
        batch = _BATCH if self.tokenizer.pad_token is not None else 1
        for i in range(0, len(texts), batch):
            enc = self.tokenizer(texts[i:i + batch], padding=batch > 1, truncation=True, max_length=self.max_length,
                                 return_tensors="pt").to(self.device)
            _check_ids(enc["input_ids"], self.core, "the causal LM")
            mask = enc["attention_mask"].bool()
            logits = self.core(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
            valid = mask[:, 1:] & mask[:, :-1]
            lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)[valid]
            yield lp.cpu(), enc["input_ids"][:, 1:][valid].cpu()


class _Store:
    """The original model's per-batch log-probs: in memory up to a budget, then spilled to a temporary directory."""

    def __init__(self, budget: int | None = None):
        self.items: list[torch.Tensor | Path] = []
        self.size, self.budget, self.tmp = 0, _SPILL_BYTES if budget is None else budget, None

    def add(self, t: torch.Tensor) -> None:
        self.size += t.numel() * t.element_size()
        if self.size <= self.budget:
            self.items.append(t)
            return
        if self.tmp is None:
            self.tmp = tempfile.TemporaryDirectory(prefix="lplr_eval_")
        path = Path(self.tmp.name) / f"{len(self.items)}.pt"
        torch.save(t, path)
        self.items.append(path)

    def get(self, i: int) -> torch.Tensor:
        item = self.items[i]
        return item if isinstance(item, torch.Tensor) else torch.load(item, weights_only=True)

    def close(self) -> None:
        if self.tmp is not None:
            self.tmp.cleanup()


def _compare_causal(lm: _CausalLM, texts: list[str], swap) -> dict:
    store, nll_a, tokens = _Store(), 0.0, 0
    try:
        for lp, tgt in lm.log_probs(texts):
            nll_a -= float(lp.gather(1, tgt[:, None]).double().sum())
            tokens += tgt.numel()
            store.add(lp)
        if tokens == 0:
            raise LplrError("the evaluation text gives no token to predict; pass longer sentences")
        swap()
        nll_b, kl, agree = 0.0, 0.0, 0
        for i, (lp_b, tgt) in enumerate(lm.log_probs(texts)):
            lp_a = store.get(i)
            nll_b -= float(lp_b.gather(1, tgt[:, None]).double().sum())
            kl += float((lp_a.exp() * (lp_a - lp_b)).sum(1).clamp_min(0).double().sum())
            agree += int((lp_a.argmax(1) == lp_b.argmax(1)).sum())
    finally:
        store.close()
    return {"perplexity_original": math.exp(nll_a / tokens), "perplexity_converted": math.exp(nll_b / tokens),
            "kl_mean": kl / tokens, "top1_agreement": agree / tokens, "tokens": tokens}


# ---------------------------------------------------------------------------------------------------- public API


def _resolve_device(device: str) -> str:
    from .devices import resolve_device

    return str(resolve_device(device))


def evaluate_state_dict(original: str | os.PathLike, tensors: dict[str, torch.Tensor] | Iterable,
                        text: str | os.PathLike | list[str] | None = None, device: str = "auto", max_texts: int = 256,
                        required: set[str] | None = None) -> dict:
    """Compare the model in `original` with the same architecture carrying `tensors` (a state dict, or an iterable
    of (name, tensor) pairs in checkpoint naming). Every name in `required` (default: every float tensor) must map
    onto the model. Returns the fidelity results; writes nothing."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = _check_original(original)
    texts, source = load_texts(text, max_texts)
    device = _resolve_device(device)
    kind = model_kind(root)
    pairs = tensors.items() if isinstance(tensors, dict) else tensors
    t0 = time.perf_counter()
    loaded = 0

    def swap() -> None:
        nonlocal loaded
        loaded = _overwrite_weights(runner.core, pairs, required)

    if kind == KIND_CAUSAL:
        runner = _CausalLM(root, device)
        result = _compare_causal(runner, texts, swap)
    else:
        runner = _Encoder(root, device)
        emb_a = runner.embed(texts)
        swap()
        result = compare_embeddings(emb_a, runner.embed(texts))
    logger.info(f"fidelity of {kind} on {len(texts)} texts: " + ", ".join(
        f"{k}={v:.4g}" for k, v in result.items() if isinstance(v, float)))
    return {"kind": kind, **result, "texts": len(texts), "text_source": source, "original": str(root),
            "device": device, "tensors_loaded": loaded, "seconds": round(time.perf_counter() - t0, 2)}


def _check_is_the_source(root: Path, out: Path, source: dict) -> None:
    """`root` must be the checkpoint `out` was converted from: the same model type and the weight files whose sha256
    the manifest records (another checkpoint of the same shapes would give numbers about a different model)."""
    from .verify import check_is_the_source

    src_type, orig_type = source.get("model_type"), _config(root).get("model_type")
    if src_type and orig_type and src_type != orig_type:
        raise LplrError(f"{opt('original')} {root} is a {orig_type} model but {out} was converted from a {src_type} "
                        f"model; pass the checkpoint that was converted")
    check_is_the_source(root, out, source, "original")


def evaluate(original: str | os.PathLike, converted: str | os.PathLike,
             text: str | os.PathLike | list[str] | None = None, device: str = "auto", max_texts: int = 256) -> dict:
    """Run the original and the converted model on `text` (default: the packaged English sentences), store the
    results in the converted directory's manifest under "eval", re-render its report, and return the results."""
    from .io.manifest import Manifest, read_manifest, seal_digests, write_json_atomic
    from .io.outdir import OutputLock
    from .io.output import ConvertedOutput
    from .report import write_report

    out = Path(converted)
    read_manifest(out)  # a finished conversion, before the lock creates anything in it
    with OutputLock.updating(out):  # no convert --overwrite, export or report of `out` meanwhile
        document = read_manifest(out)
        manifest = Manifest.from_json(document)
        root = _check_original(original)
        _check_is_the_source(root, out, manifest.source)
        required = {r.name for r in manifest.tensors if r.method != "copy"}
        with ConvertedOutput(out) as output:  # one tensor at a time
            result = evaluate_state_dict(root, output.iter_dense(), text, device, max_texts, required)
        result["converted"] = str(out.resolve())
        document[C.M_EVAL] = result  # not covered by the integrity hash: the manifest stays valid
        write_json_atomic(out / C.MANIFEST_FILE, seal_digests(document))
        write_report(out, document)
    return result
