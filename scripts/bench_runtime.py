#!/usr/bin/env python
"""Running a converted model (issue 21, item 5): memory and speed of loaded models, ours beside the originals and
beside HQQ, torchao and bitsandbytes.

For each model and each configuration, in a fresh subprocess (one per configuration): the model is loaded the way a
user loads it, then measured:

- parameters+buffers bytes (a tensor subclass counted by its inner tensors; ties counted once) and the bytes of
  every tensor the modules hold, registered or not (HQQ's meta, bitsandbytes' quant_state); the ratio of the latter
  to the bytes the checkpoint stores (the shards' tensor data for ours; params x dtype size for the originals);
- RSS: after the imports, after load, the peak while loading and the peak over the whole process (VmHWM);
- prefill tokens/s: one forward of 1 x PREFILL tokens filling the KV cache (best of --reps);
- greedy decode tokens/s: DECODE new tokens, one token per forward from the prefill's cache (best of --reps), and
  how many of them agree with the float32 original's tokens.

Configurations (``--configs``; default: all that apply to the model):

- ``float32``, ``bfloat16``: the original loaded by transformers in that dtype;
- ours, converted with the ``lplr-convert`` CLI (cached under ``--work-dir``, reused when complete and made by the
  same command) and loaded by ``lplr_convert.load_model(DST)`` (``--loader from-pretrained``:
  ``AutoModelForCausalLM.from_pretrained(DST)`` after ``import lplr_convert``), i.e. whatever the checked-out tree's
  loader builds: ``rtn-4`` (groups of 128, loaded in float32; ``rtn-4-bf16`` in bfloat16), ``rtn-4-g64`` (groups of
  64, asymmetric: 4.31 bits/param, one int4pack call per matrix on 576-wide inputs), ``gptq-4`` (calibrated), ``qlr-4.25`` and ``qlr-2.25`` (where the model
  has a tokenizer: calibrated, a global budget in bits/param; without: uncalibrated, b0 4 / 2 and the budget per
  tensor, since the global allocation without calibration costs minutes per 7B-shaped tensor), ``lplr`` (<= 4.25 bits/param per tensor, factors 8/8 bits),
  and for each qlr its backbone alone (``qlr-4.25-backbone``: ``--method qlr --rank 0`` at the b0 the budgeted qlr
  conversion chose, without calibration: the same modules with no correction, which is what decode speed needs);
  all but ``rtn-4`` loaded with ``dtype=torch.bfloat16`` (``--ours-dtype``), how 4-bit weights run fast on a CPU;
- peers (from a separate venv, ``--peers-python``; ``--setup-peers`` builds it): ``hqq-4-g64`` (HQQLinear 4-bit,
  groups of 64, backend PYTORCH_COMPILE, its fastest on CPU; ``hqq-4-g64-pytorch`` the plain backend),
  ``torchao-int4`` (int4 weight-only, groups of 64: the CPU tinygemm layout ``Int4OpaqueTensor`` on CPU,
  ``Int4WeightOnlyConfig`` on CUDA), ``bnb-nf4`` (bitsandbytes ``Linear4bit`` nf4, blocks of 64). Each quantizes the
  decoder blocks' linears of the original loaded in ``--peer-dtype`` (the same tensors our conversions compress:
  embeddings, norms and the head stay as they are). What installs and what does not: PEER_NOTES.

On ``llama7b-blocks`` qlr and gptq are opt-in (``--configs``): uncalibrated qlr took more than 9 minutes for one
4096 x 4096 tensor under load, and gptq needs calibration text, which a random model has no tokenizer for.

Models: ``smollm2`` (real SmolLM2-135M-Instruct, float32 safetensors; its publisher quantized it to 4 bits in blocks
of 32, GGUF Q4_1, so 4-bit results on it are flattering for quality, not for speed) and ``llama7b-blocks`` (a
LlamaForCausalLM with LLaMA-7B's block shapes: hidden 4096, intermediate 11008, 32 heads, ``--llama-layers`` blocks,
vocabulary 1024 so that the blocks dominate; random weights, float32 safetensors).

Usage::

    python scripts/bench_runtime.py --setup-peers          # once: /work/cache/peers-venv (or --peers-venv DIR)
    python scripts/bench_runtime.py                         # full run: artifacts/runtime/{results.json,results.md,NOTES.md}
    python scripts/bench_runtime.py --quick                 # smoke run on the real models: few tokens
    python scripts/bench_runtime.py --tiny --write DIR      # seconds: the test's mode (a tiny model, no peers)

Progress goes to stderr; each measurement is printed as one JSON line on stdout as it arrives.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import pick_device, proc_status, reset_peak_rss, sync

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "artifacts" / "runtime"
DEFAULT_WORK = Path(os.environ.get("LPLR_BENCH_WORK", "/work/cache/bench-runtime"))
DEFAULT_PEERS_VENV = Path(os.environ.get("LPLR_PEERS_VENV", "/work/cache/peers-venv"))
DEFAULT_SMOLLM2 = Path(os.environ.get("LPLR_SMOLLM2", "/work/cache/smollm2-135m"))
SEED = 1234
SMOLLM2_NOTE = ("SmolLM2-135M-Instruct: its publisher quantized it to 4 bits in blocks of 32 (GGUF Q4_1), so 4-bit "
                "conversions of it are nearly lossless; speed and memory are not affected by this")
PEERS = {  # package -> the pip install line of the peers venv (--no-deps: torch and transformers are not touched)
    "hqq": ["hqq", "einops", "termcolor"],
    "torchao": ["torchao"],
    "bitsandbytes": ["bitsandbytes"],
}


@dataclass(frozen=True)
class Config:
    name: str
    kind: str  # original | ours | peer
    dtype: str | None = None  # originals: their dtype; ours: dtype= for the loader (None: --ours-dtype)
    convert: tuple[str, ...] = ()  # ours: CLI options after --in-path/--out-path
    uncalibrated: tuple[str, ...] | None = None  # ours: the options instead on a model without a tokenizer
    calibrated: bool = False  # ours: pass --calibration STATS where the model has a tokenizer
    backbone_of: str | None = None  # ours: qlr --rank 0 at the b0 that config chose
    same_as: str | None = None  # ours: load that configuration's conversion (with another dtype)
    peer: str | None = None  # hqq | torchao | bnb
    backend: str | None = None  # hqq backend
    bits: float | None = None  # nominal bits of the peers' quantized linears (for the table before measuring)


CONFIGS = {c.name: c for c in (
    Config("float32", "original", dtype="float32"),
    Config("bfloat16", "original", dtype="bfloat16"),
    Config("rtn-4", "ours", dtype="float32",
           convert=("--method", "rtn", "--b0", "4", "--quantizer", "group", "--group-size", "128")),
    Config("rtn-4-bf16", "ours", dtype="bfloat16", same_as="rtn-4"),
    # groups of 64, asymmetric (4.31 bits/param: still fewer than the peers' 4.5): one int4pack call per matrix on
    # SmolLM2's 576-wide inputs (128 leaves a short last group: two calls), and cached scales within the budget
    Config("rtn-4-g64", "ours", dtype="bfloat16", convert=("--method", "rtn", "--b0", "4", "--quantizer", "group",
                                                           "--group-size", "64", "--scheme", "asymmetric")),
    Config("gptq-4", "ours", convert=("--method", "gptq", "--b0", "4"), calibrated=True),
    # Without calibration the global budget's allocation costs minutes per 7B-shaped tensor (the residual's spectrum
    # at each candidate width): there each tensor gets the budget (--bits-per-param) at the width the rule gives.
    Config("qlr-4.25", "ours", convert=("--method", "qlr", "--target-bits-per-param", "4.25"), calibrated=True,
           uncalibrated=("--method", "qlr", "--b0", "4", "--bits-per-param", "4.25")),
    Config("qlr-4.25-backbone", "ours", backbone_of="qlr-4.25"),
    Config("qlr-2.25", "ours", convert=("--method", "qlr", "--target-bits-per-param", "2.25"), calibrated=True,
           uncalibrated=("--method", "qlr", "--b0", "2", "--bits-per-param", "2.25")),
    Config("qlr-2.25-backbone", "ours", backbone_of="qlr-2.25"),
    Config("lplr", "ours", convert=("--method", "lplr", "--bits-per-param", "4.25")),
    Config("hqq-4-g64", "peer", peer="hqq", backend="PYTORCH_COMPILE"),
    Config("hqq-4-g64-pytorch", "peer", peer="hqq", backend="PYTORCH"),
    Config("torchao-int4", "peer", peer="torchao"),
    Config("bnb-nf4", "peer", peer="bnb"),
)}
DEFAULT_CONFIGS = {  # hqq-4-g64-pytorch is opt-in (its plain backend dequantizes every weight at every call)
    "smollm2": ("float32", "bfloat16", "rtn-4", "rtn-4-bf16", "rtn-4-g64", "gptq-4", "qlr-4.25", "qlr-4.25-backbone",
                "qlr-2.25", "qlr-2.25-backbone", "lplr", "hqq-4-g64", "torchao-int4", "bnb-nf4"),
    # qlr is opt-in on the 7B-shaped blocks: without calibration one 4096 x 4096 tensor was not converted after 9 min
    # (load average ~20 on 2 cores), so 28 tensors per budget are not "quick" (issue 21: qlr there where it is quick).
    "llama7b-blocks": ("float32", "bfloat16", "rtn-4", "rtn-4-bf16", "rtn-4-g64", "lplr", "hqq-4-g64", "torchao-int4",
                       "bnb-nf4"),
    "tiny": ("float32", "bfloat16", "rtn-4", "gptq-4", "qlr-4.25", "qlr-4.25-backbone", "lplr"),
}


@dataclass(frozen=True)
class Mode:
    prefill: int
    decode: int
    samples: int  # calibration
    seq_len: int
    reps: int


MODES = {"full": Mode(512, 64, 16, 256, 2), "quick": Mode(64, 8, 16, 256, 1), "tiny": Mode(16, 4, 2, 16, 1)}
LLAMA7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32,
           "vocab_size": 1024, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_hidden_layers": 2, "max_position_embeddings": 256, "tie_word_embeddings": True}


def log(msg: str) -> None:
    print(f"[bench_runtime {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Bytes: what a checkpoint stores, what a loaded model holds


def stored_tensor_bytes(root: Path) -> tuple[int, int]:
    """(tensor data bytes, element count) of every safetensors file in `root`, from their headers."""
    nbytes = numel = 0
    for f in sorted(root.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for k, v in header.items():
            if k != "__metadata__":
                a, b = v["data_offsets"]
                nbytes += b - a
                count = 1
                for d in v["shape"]:
                    count *= d
                numel += count
    return nbytes, numel


def _leaves(t):
    """The plain tensors behind `t`: a wrapper subclass (torchao) by its __tensor_flatten__ inner tensors."""
    import torch

    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is not None and type(t) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = t.__tensor_flatten__()
        for n in names:
            yield from _leaves(getattr(t, n))
    else:
        yield t


class ByteCounter:
    """Bytes of distinct tensors (by data pointer and size), meta tensors skipped."""

    def __init__(self):
        self.seen: set[tuple[int, int]] = set()
        self.visited: set[int] = set()  # objects walked (cycles)
        self.total = 0

    def add(self, t) -> int:
        import torch

        added = 0
        for leaf in _leaves(t):
            if not isinstance(leaf, torch.Tensor) or leaf.device.type == "meta":
                continue
            nb = leaf.numel() * leaf.element_size()
            key = (leaf.data_ptr(), nb)
            if nb and key not in self.seen:
                self.seen.add(key)
                self.total += nb
                added += nb
        return added

    def walk(self, obj, depth: int = 0) -> int:
        """Tensors reachable from a non-module object: containers and plain attributes, a few levels deep (e.g.
        module -> _parameters -> Params4bit -> quant_state -> absmax)."""
        import torch

        if depth >= 6 or id(obj) in self.visited or isinstance(obj, (str, bytes, int, float, bool, type(None),
                                                                          torch.nn.Module)):
            return 0
        self.visited.add(id(obj))
        if isinstance(obj, torch.Tensor):
            return self.add(obj) + (self.walk(vars(obj), depth + 1) if vars(obj) else 0)
        if isinstance(obj, dict):
            return sum(self.walk(v, depth + 1) for v in obj.values())
        if isinstance(obj, (list, tuple, set)):
            return sum(self.walk(v, depth + 1) for v in obj)
        if hasattr(obj, "__dict__") and not isinstance(obj, type):
            return sum(self.walk(v, depth + 1) for v in vars(obj).values())
        return 0


def model_bytes(model) -> dict:
    """params_buffers_bytes (registered parameters and buffers) and held_bytes (also tensors hanging off modules and
    parameters as plain attributes), each tensor counted once."""
    pb = ByteCounter()
    for t in list(model.parameters()) + list(model.buffers()):
        pb.add(t)
    held = ByteCounter()
    for mod in model.modules():
        for k, v in vars(mod).items():
            if k != "_modules":
                held.walk(v)
    return {"params_buffers_bytes": pb.total, "held_bytes": held.total}


def module_types(model) -> dict[str, int]:
    """How many modules of each class hold a weight-like tensor directly: tells packed from float layers."""
    out: dict[str, int] = {}
    for mod in model.modules():
        if list(mod.children()):
            continue
        if any(p.dim() >= 2 for p in mod.parameters(recurse=False)) or any(
                b.dim() >= 2 for b in mod.buffers(recurse=False)) or type(mod).__module__.split(".")[0] in (
                "hqq", "bitsandbytes", "torchao", "lplr_convert"):
            out[type(mod).__name__] = out.get(type(mod).__name__, 0) + 1
    return out


# ---------------------------------------------------------------------------------------------------------------
# The worker: one configuration in this process


def _block_linears(model):
    import torch

    layers = model.model.layers
    return [(f"model.layers.{i}.{n}", m) for i, layer in enumerate(layers) for n, m in layer.named_modules()
            if type(m) is torch.nn.Linear]


def _set(model, dotted: str, new) -> None:
    parent, _, leaf = dotted.rpartition(".")
    setattr(model.get_submodule(parent), leaf, new)


def load_peer(job: dict, model, dtype, device: str) -> tuple[dict, float]:
    """Quantize the decoder blocks' linears with the peer; (versions, bits of the quantized linears as held)."""
    import torch

    linears = _block_linears(model)
    params = sum(m.weight.numel() for _, m in linears)
    peer = job["peer"]
    if peer == "hqq":
        import hqq
        from hqq.core.quantize import BaseQuantizeConfig, HQQBackend, HQQLinear

        HQQLinear.set_backend(getattr(HQQBackend, job["backend"]))
        cfg = BaseQuantizeConfig(nbits=4, group_size=64)
        new = []
        for name, lin in linears:
            q = HQQLinear(lin, cfg, compute_dtype=dtype, device=device, del_orig=True)
            _set(model, name, q)
            new.append(q)
        version = {"hqq": getattr(hqq, "__version__", None) or _dist_version("hqq")}
    elif peer == "torchao":
        import torchao
        from torchao.quantization import quantize_

        keep = {id(m) for _, m in linears}
        if device == "cpu":
            from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig

            cfg = PrototypeInt4WeightOnlyConfig(group_size=64)  # 128 divides no SmolLM2 width but 1536
        else:
            from torchao.quantization import Int4WeightOnlyConfig
            from torchao.quantization.quantize_.workflows import Int4PackingFormat

            cfg = Int4WeightOnlyConfig(group_size=64, int4_packing_format=Int4PackingFormat.TILE_PACKED_TO_4D)
        quantize_(model, cfg, filter_fn=lambda m, fqn: id(m) in keep)
        new = [m for _, m in linears]
        skipped = sum(type(m.weight) in (torch.Tensor, torch.nn.Parameter) for m in new)  # shapes it cannot group
        version = {"torchao": torchao.__version__, "torchao_config": type(cfg).__name__, "torchao_skipped": skipped}
    elif peer == "bnb":
        import bitsandbytes as bnb

        new = []
        for name, lin in linears:
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=dtype,
                                  quant_type="nf4", device="meta")
            q.weight = bnb.nn.Params4bit(lin.weight.data.to(dtype), requires_grad=False, quant_type="nf4")
            if lin.bias is not None:
                q.bias = torch.nn.Parameter(lin.bias.data, requires_grad=False)
            q = q.to(device)
            _set(model, name, q)
            new.append(q)
        version = {"bitsandbytes": bnb.__version__}
    else:
        raise ValueError(f"unknown peer {peer}")
    counter = ByteCounter()
    for mod in new:
        for k, v in vars(mod).items():
            if k != "_modules":
                counter.walk(v)
    return version, counter.total * 8 / params


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def load_for(job: dict, device: str):
    """(model, facts) for one configuration, loaded the way its users load it."""
    import torch
    import transformers

    facts: dict = {}
    dtype = getattr(torch, job["dtype"]) if job.get("dtype") else None
    if job["kind"] == "original":
        model = transformers.AutoModelForCausalLM.from_pretrained(job["src"], dtype=dtype)
    elif job["kind"] == "ours":
        import lplr_convert

        facts["lplr_convert"] = lplr_convert.__version__
        if job["loader"] == "from-pretrained":
            model = transformers.AutoModelForCausalLM.from_pretrained(job["path"], **({"dtype": dtype} if dtype else {}))
        else:
            model = lplr_convert.load_model(job["path"], device=device, **({"dtype": dtype} if dtype else {}))
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(job["src"], dtype=dtype)
        versions, bits = load_peer(job, model, dtype, device)
        facts |= versions
        facts["linear_bits_held"] = bits
    return model.to(device).eval(), facts


def _greedy(model, ids, n: int, device: str) -> tuple[float, float, list[int]]:
    """(prefill seconds, decode seconds, tokens): one forward over `ids`, then n greedy single-token forwards."""
    import torch

    with torch.inference_mode():
        sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        sync(device)
        t1 = time.perf_counter()
        tok = out.logits[:, -1:].argmax(-1)
        cache, tokens = out.past_key_values, []
        sync(device)
        t2 = time.perf_counter()
        for _ in range(n):
            tokens.append(int(tok))
            out = model(input_ids=tok, past_key_values=cache, use_cache=True)
            cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        sync(device)
        t3 = time.perf_counter()
    return t1 - t0, t3 - t2, tokens


def worker(job: dict) -> dict:
    import torch

    device = job["device"]
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    rec = {"kind": "run", "model": job["model"], "config": job["config"], "config_kind": job["kind"],
           "device": device, "threads": torch.get_num_threads(), "status": "ok"}
    try:
        import transformers  # noqa: F401  (counted in the baseline, as every configuration imports it)

        if job["kind"] == "ours":
            import lplr_convert  # noqa: F401
        rec["rss_base_bytes"] = proc_status()["VmRSS"]
        reset_peak_rss()
        t0 = time.perf_counter()
        model, facts = load_for(job, device)
        sync(device)
        rec["load_seconds"] = time.perf_counter() - t0
        st = proc_status()
        rec |= {"rss_after_load_bytes": st["VmRSS"], "peak_rss_load_bytes": st["VmHWM"], **facts}
        rec |= model_bytes(model)
        rec["module_types"] = module_types(model)
        rec["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
        if device.startswith("cuda"):
            rec["cuda_allocated_after_load_bytes"] = torch.cuda.memory_allocated()
        ids = torch.tensor([job["prompt"]], dtype=torch.long, device=device)
        _greedy(model, ids[:, : max(2, min(16, ids.shape[1]))], min(2, job["decode"]), device)  # warm-up
        prefills, decodes, tokens = [], [], []
        for _ in range(job["reps"]):
            p, d, tokens = _greedy(model, ids, job["decode"], device)
            prefills.append(p)
            decodes.append(d)
        rec |= {"prefill_tokens": ids.shape[1], "decode_tokens": job["decode"], "prefill_seconds": prefills,
                "decode_seconds": decodes, "prefill_tok_s": ids.shape[1] / min(prefills),
                "decode_tok_s": job["decode"] / min(decodes), "tokens": tokens}
        st = proc_status()
        rec |= {"rss_end_bytes": st["VmRSS"], "peak_rss_bytes": max(st["VmHWM"], rec["peak_rss_load_bytes"])}
        if device.startswith("cuda"):
            rec["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    except Exception as e:  # noqa: BLE001  (a failing configuration is a record, not the end of the run)
        rec |= {"status": "error", "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    return rec


def _failed(job: dict, error: str) -> dict:
    return {"kind": "run", "model": job["model"], "config": job["config"], "config_kind": job["kind"],
            "status": "error", "error": error}


def run_jobs(jobs: list[dict], python: str, timeout: float) -> list[dict]:
    """The configurations in one fresh interpreter (`python`: the product's or the peers' venv), one record each;
    a full run passes one job at a time, the tiny mode all of a model's (one interpreter start)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
    cmd = [python, str(Path(__file__).resolve()), "--worker", json.dumps(jobs)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout * len(jobs), cwd=ROOT, env=env,
                              check=False)
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out, err, rc = (e.stdout or b"").decode(), f"timed out after {timeout * len(jobs):.0f} s", None
    got = {}
    for ln in out.splitlines():
        if ln.startswith("{"):
            rec = json.loads(ln)
            got[rec["config"]] = rec
    tail = ([ln for ln in err.strip().splitlines() if ln.strip()][-1:] or ["no output"])[0][:300]
    return [got.get(j["config"]) or _failed(j, f"worker exit {rc}: {tail}") for j in jobs]


# ---------------------------------------------------------------------------------------------------------------
# Sources and conversions


RECONVERT = False  # --reconvert: ignore the cache


def _stamp_ok(stamp: Path, cmd: list) -> bool:
    """Whether `stamp` records `cmd` (plus the tool's version and format), i.e. the cached output can be reused."""
    try:
        return not RECONVERT and json.loads(stamp.read_text()) == _stamped(cmd)
    except (OSError, json.JSONDecodeError):
        return False


def _stamped(cmd: list) -> list:
    import lplr_convert
    from lplr_convert import constants as C

    return [*cmd, f"lplr_convert {lplr_convert.__version__} format {C.FORMAT_VERSION}"]


def write_llama(path: Path, layers: int, cfg: dict, seed: int = SEED, tokenizer_from: Path | None = None) -> Path:
    """A random-init LlamaForCausalLM (float32 safetensors) with `cfg`, reused when made with the same settings."""
    want = [f"llama layers={layers} seed={seed}", json.dumps(cfg, sort_keys=True), str(tokenizer_from)]
    stamp = path.with_name(path.name + ".cmd.json")
    if (path / "config.json").is_file() and _stamp_ok(stamp, want):
        return path
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    log(f"writing a random {layers}-block LlamaForCausalLM to {path}")
    torch.manual_seed(seed)
    extra = {}
    if tokenizer_from is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tokenizer_from), local_files_only=True)
        extra["vocab_size"] = len(tok)
    config = LlamaConfig(**{**cfg, **extra, "num_hidden_layers": layers})
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.float32)
    if path.exists():
        shutil.rmtree(path)
    model.save_pretrained(str(path), max_shard_size="2GB")
    if tokenizer_from is not None:
        tok.save_pretrained(str(path))
    stamp.write_text(json.dumps(_stamped(want)))
    return path


def cli(args: list[str], in_process: bool, log_file: Path) -> None:
    """One `lplr-convert` command: a subprocess (its own memory), or in this process for the tiny mode."""
    log("lplr-convert " + " ".join(args))
    if in_process:
        import contextlib

        from lplr_convert.cli import main as cli_main

        try:
            with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON records only
                cli_main(args, standalone_mode=False)
        except SystemExit as e:
            if e.code:
                raise RuntimeError(f"lplr-convert {' '.join(args)} exited {e.code}") from None
        return
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with open(log_file, "w") as f:
        proc = subprocess.run([sys.executable, "-c", "from lplr_convert.cli import main; main()", *args],
                              stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, check=False)
    if proc.returncode != 0:
        tail = log_file.read_text().strip().splitlines()[-1:] or [""]
        raise RuntimeError(f"lplr-convert {' '.join(args[:1])} exited {proc.returncode}: {tail[0][:300]}")


def calibrate(src: Path, work: Path, mode: Mode, device: str, in_process: bool) -> Path:
    from lplr_convert import constants as C

    out = work / "stats"
    cmd = ["calibrate", "--in-path", str(src), "--out-path", str(out), "--samples", str(mode.samples),
           "--seq-len", str(mode.seq_len), "--device", device]
    stamp = work / "stats.cmd.json"
    if (out / C.CALIB_MANIFEST).is_file() and not (out / C.CALIB_PROGRESS).exists() and _stamp_ok(stamp, cmd):
        return out
    cli([*cmd, "--overwrite"] if out.exists() else cmd, in_process, work / "stats.log")
    stamp.write_text(json.dumps(_stamped(cmd)))
    return out


def backbone_recipe(path: Path, recipe: Path) -> dict[int, int]:
    """Write a recipe giving each tensor of a qlr conversion its backbone alone (qlr at rank 0) at the width that
    conversion's allocation chose for it; {width: tensors}."""
    import re

    from lplr_convert.io.manifest import read_manifest

    widths: dict[int, list[str]] = {}
    for t in read_manifest(path)["tensors"]:
        if t["method"] == "qlr":
            widths.setdefault(t["b0"], []).append(t["name"])
    rules = [{"pattern": "^(" + "|".join(re.escape(n) for n in names) + ")$", "method": "qlr", "rank": 0, "b0": b}
             for b, names in sorted(widths.items())]
    recipe.write_text(json.dumps({"rules": rules}, indent=1))
    return {b: len(names) for b, names in widths.items()}


def convert(cfg: Config, src: Path, work: Path, stats: Path | None, device: str, threads: int | None,
            in_process: bool, done: dict[str, Path]) -> Path:
    out = work / cfg.name
    if cfg.backbone_of:
        recipe = work / f"{cfg.name}.recipe.json"
        widths = backbone_recipe(done[cfg.backbone_of], recipe)
        log(f"{cfg.name}: backbone widths {widths} (b0: tensors) from {cfg.backbone_of}")
        opts = ["--method", "qlr", "--rank", "0", "--recipe", str(recipe)]
    elif cfg.calibrated and stats:
        opts = [*cfg.convert, "--calibration", str(stats)]
    else:
        opts = list(cfg.uncalibrated if cfg.uncalibrated is not None else cfg.convert)
    cmd = ["convert", "--in-path", str(src), "--out-path", str(out), *opts, "--no-report", "--device", device,
           *(["--threads", str(threads)] if threads else [])]
    stamp = work / f"{cfg.name}.cmd.json"
    key = [*cmd, recipe.read_text()] if cfg.backbone_of else cmd
    from lplr_convert.io.manifest import is_complete

    if is_complete(out) and _stamp_ok(stamp, key):
        log(f"reusing {out}")
        return out
    t0 = time.perf_counter()
    cli([*cmd, "--overwrite"] if out.exists() else cmd, in_process, work / f"{cfg.name}.log")
    stamp.write_text(json.dumps(_stamped(key)))
    log(f"converted {cfg.name} in {time.perf_counter() - t0:.0f} s")
    return out


def linear_bits_stored(path: Path) -> tuple[float, float]:
    """(bits/param of the compressed tensors, their share of all parameters) from the manifest."""
    from lplr_convert.io.manifest import read_manifest

    tensors = read_manifest(path)["tensors"]
    comp = [t for t in tensors if t["method"] != "copy"]
    numel = sum(_prod(t["shape"]) for t in comp)
    total = sum(_prod(t["shape"]) for t in tensors)
    return sum(t["stored_bytes"] for t in comp) * 8 / max(numel, 1), numel / max(total, 1)


def _prod(shape) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def prompt_ids(src: Path, n: int, vocab: int) -> tuple[list[int], str]:
    """n token ids: the bundled calibration text through the model's tokenizer, or seeded random ids without one."""
    if (src / "tokenizer.json").is_file() or (src / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        from lplr_convert.calibration.text import read_text

        tok = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
        ids: list[int] = []
        for line in read_text().lines:
            ids += tok(line + "\n", add_special_tokens=False)["input_ids"]
            if len(ids) >= n:
                return ids[:n], "the bundled calibration text (lplr_convert/data/calibration_text.txt)"
    import torch

    gen = torch.Generator().manual_seed(SEED)
    return torch.randint(0, vocab, (n,), generator=gen).tolist(), f"random ids (seed {SEED})"


# ---------------------------------------------------------------------------------------------------------------
# Derived numbers, targets, tables


def derive(records: list[dict]) -> list[dict]:
    """Fill each run's ratios (to stored, to bfloat16, to the best peer) and return the target records."""
    targets: list[dict] = []
    for model in dict.fromkeys(r["model"] for r in records if r.get("kind") == "run"):
        runs = {r["config"]: r for r in records if r.get("kind") == "run" and r["model"] == model}
        ok = {k: r for k, r in runs.items() if r.get("status") == "ok"}
        f32 = ok.get("float32")
        bf16 = ok.get("bfloat16")
        peers = [r for r in ok.values() if r["config_kind"] == "peer"]
        best_peer = max(peers, key=lambda r: r["decode_tok_s"], default=None)
        for r in ok.values():
            if r.get("stored_bytes"):
                r["ratio_to_stored"] = r["held_bytes"] / r["stored_bytes"]
                r["bits_per_param_stored"] = r["stored_bytes"] * 8 / r["params"]
            if bf16:
                r["decode_vs_bf16"] = r["decode_tok_s"] / bf16["decode_tok_s"]
                r["prefill_vs_bf16"] = r["prefill_tok_s"] / bf16["prefill_tok_s"]
            if best_peer:
                r["decode_vs_best_peer"] = r["decode_tok_s"] / best_peer["decode_tok_s"]
                r["best_peer"] = best_peer["config"]
            if f32 and r.get("tokens") and f32.get("tokens"):
                same = 0
                for a, b in zip(r["tokens"], f32["tokens"]):
                    if a != b:
                        break
                    same += 1
                r["tokens_agree_with_float32"] = same
        for r in runs.values():
            if r["config_kind"] != "ours":
                continue
            name = r["config"]
            if r.get("status") != "ok":
                targets.append({"kind": "target", "model": model, "config": name, "target": "measured",
                                "pass": False, "detail": r.get("error")})
                continue
            targets.append({"kind": "target", "model": model, "config": name, "target": "memory <= 1.05 x stored",
                            "value": r["ratio_to_stored"], "pass": r["ratio_to_stored"] <= 1.05,
                            "detail": f"held {r['held_bytes'] / 2**20:.1f} MiB, stored "
                                      f"{r['stored_bytes'] / 2**20:.1f} MiB"})
            if name in ("rtn-4", "rtn-4-bf16", "rtn-4-g64", "gptq-4", "qlr-4.25"):
                if bf16:
                    targets.append({"kind": "target", "model": model, "config": name,
                                    "target": "4-bit decode tok/s >= bfloat16 original's",
                                    "value": r["decode_vs_bf16"], "pass": r["decode_vs_bf16"] >= 1.0,
                                    "detail": f"{r['decode_tok_s']:.2f} vs {bf16['decode_tok_s']:.2f} tok/s"})
                rivals = [p for p in peers if p.get("linear_bits_held", 0) >= r["linear_bits"] - 1e-9]
                rival = max(rivals, key=lambda p: p["decode_tok_s"], default=None)
                targets.append({"kind": "target", "model": model, "config": name,
                                "target": "4-bit decode tok/s >= fastest peer at equal or more bits",
                                "value": r["decode_tok_s"] / rival["decode_tok_s"] if rival else None,
                                "pass": r["decode_tok_s"] >= rival["decode_tok_s"] if rival else None,
                                "detail": (f"{r['decode_tok_s']:.2f} vs {rival['config']} "
                                           f"{rival['decode_tok_s']:.2f} tok/s ({rival['linear_bits_held']:.2f} vs "
                                           f"{r['linear_bits']:.2f} bits/param in the linears)")
                                          if rival else "no peer measured at equal or more bits"})
            backbone = ok.get(f"{name}-backbone")
            if name.startswith("qlr") and not name.endswith("backbone"):
                ratio = (r["decode_tok_s"] and backbone["decode_tok_s"] / r["decode_tok_s"]) if backbone else None
                targets.append({"kind": "target", "model": model, "config": name,
                                "target": "qlr decode time <= 1.3 x its backbone alone", "value": ratio,
                                "pass": ratio <= 1.3 if ratio is not None else None,
                                "detail": (f"{r['decode_tok_s']:.2f} vs backbone {backbone['decode_tok_s']:.2f} "
                                           f"tok/s") if backbone else "backbone not measured"})
    return targets


def _mb(b) -> str:
    return "-" if b is None else f"{b / 1e6:.1f}"


def _f(x, fmt="{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def markdown(doc: dict) -> str:
    env = doc["env"]
    title = (f"# Running converted models: memory and speed ({env['date']}, {env['cpu']}, {env['cores']} cores, "
             f"{env['threads']} threads, device {env['device']})")
    intro = (f"Mode {env['mode']}; tree {env['git']}; torch {env['torch']}, transformers {env['transformers']}; "
             f"load average at start {env['loadavg']}, at end {doc['env_end']['loadavg']}. "
             f"Prefill: 1 x {env['prefill']} tokens; decode: {env['decode']} greedy tokens from the prefill's cache; "
             f"best of {env['reps']}. Our loader: {env['loader']}. Peers: {env.get('peers') or 'none'}.")
    header = ("| config | bits/param stored (linears) | params+buffers MB | held MB | ratio to stored "
              "| RSS after load MB | RSS after run MB | peak RSS MB | prefill tok/s | decode tok/s | decode / bf16 "
              "| decode / best peer | tokens = fp32 | layers |")
    L = [title, "", intro, ""]
    for m in doc["models"]:
        L += [f"## {m['model']}", "", m["description"], ""]
        if m.get("note"):
            L += [f"**{m['note']}.**", ""]
        L += [header, "|" + "---|" * 14]
        for r in (r for r in doc["runs"] if r["model"] == m["model"]):
            if r.get("status") != "ok":
                L.append(f"| {r['config']} | {r.get('error', 'failed')} |" + " |" * 12)
                continue
            bits = (f"{_f(r.get('bits_per_param_stored'))} ({_f(r.get('linear_bits'))})"
                    if r.get("stored_bytes") else f"- ({_f(r.get('linear_bits') or r.get('linear_bits_held'))} held)")
            types = ", ".join(f"{k} {v}" for k, v in sorted(r.get("module_types", {}).items()))
            L.append(f"| {r['config']} | {bits} | {_mb(r['params_buffers_bytes'])} | {_mb(r['held_bytes'])} "
                     f"| {_f(r.get('ratio_to_stored'), '{:.3f}')} | {_mb(r['rss_after_load_bytes'])} "
                     f"| {_mb(r['rss_end_bytes'])} | {_mb(r['peak_rss_bytes'])} | {_f(r['prefill_tok_s'], '{:.1f}')} "
                     f"| {_f(r['decode_tok_s'])} | {_f(r.get('decode_vs_bf16'))} | {_f(r.get('decode_vs_best_peer'))} "
                     f"| {r.get('tokens_agree_with_float32', '-')}/{r['decode_tokens']} | {types} |")
        L.append("")
        ts = [t for t in doc["targets"] if t["model"] == m["model"]]
        if ts:
            L += ["| target | config | value | met | detail |", "|---|---|---|---|---|"]
            L += [f"| {t['target']} | {t['config']} | {_f(t.get('value'), '{:.3f}')} | "
                  f"{ {True: 'yes', False: '**no**', None: 'n/a'}[t['pass']]} | {t.get('detail') or ''} |" for t in ts]
            L.append("")
    if doc.get("peer_setup"):
        L += ["## Peers", "", *[f"- {k}: {v}" for k, v in doc["peer_setup"].items()], ""]
    return "\n".join(L) + "\n"


PEER_NOTES = """\
Peers (separate venv, `--setup-peers`: the product venv's torch and transformers through a .pth file, each peer
installed with `pip install --no-deps`, so none can replace torch 2.13.0 CPU nor become a dependency of the product):

- HQQ 0.2.8.post1 (sdist, built with DISABLE_CUDA=1; needs einops and termcolor): HQQLinear 4-bit, groups of 64,
  scale and zero per group in the compute dtype. Its CPU backends: PYTORCH (dequantize per call), PYTORCH_COMPILE
  (the same through torch.compile: the fastest here, measured on one 1024 x 2816 linear); ATEN needs the hqq_aten
  extension, which is not built (CUDA), and falls back. Its torchao_int4/gemlite/bitblas/marlin backends are GPU-only.
- torchao 0.18.0 (wheel; its CUDA extensions fail to load on this CPU machine, which the int4 CPU path does not
  use): on CPU `PrototypeInt4WeightOnlyConfig(group_size=128)` gives Int4OpaqueTensor, which packs for and calls
  aten `_weight_int4pack_mm_for_cpu` (the 0.18 `Int4WeightOnlyConfig` formats target GPU kernels). Groups of 64:
  with 128 it leaves every linear whose input width is not a multiple (SmolLM2's 576) in bfloat16, silently
  (measured: 13.06 bits/param held in SmolLM2's linears); `torchao_skipped` in results.json counts such linears.
- bitsandbytes 0.50.2 (wheel, ships its CPU library): `Linear4bit` nf4, blocks of 64. Its optimized CPU 4-bit
  matmul is fetched from the Hugging Face Hub (kernels-community/quantization-bitsandbytes, needs the `kernels`
  package), which this machine cannot reach: it runs its PyTorch fallback, so its speed here is not its best.
"""

MEANINGS = """\
What each number means:

- **bits/param stored**: the bytes of the checkpoint's tensor data (safetensors headers excluded) x 8 / all parameters
  of the model; in parentheses the same over the compressed linears alone (from the manifest: codes, scales, zero
  points). Originals: their dtype. Peers have no stored form here: in parentheses the bits/param their quantized
  linears hold in memory.
- **params+buffers MB**: registered parameters and buffers (10^6 bytes), tensor subclasses by their inner tensors,
  tied tensors once. **held MB**: also the tensors modules and parameters keep as plain attributes (HQQ's scales and
  zeros, bitsandbytes' quant_state); the memory target uses this one. **ratio to stored** = held / stored bytes.
- **RSS after load / after run / peak RSS** (10^6 bytes): VmRSS once loaded and once measured, and VmHWM over the
  whole process (load, prefill, decode), all including the interpreter, torch and transformers (rss_base_bytes in
  results.json: after the imports). transformers maps a float32 safetensors file and uses its tensors in place, so an
  original's pages count only once touched: read its RSS after the run. Peers quantize at load time from the float
  original, so their peak includes it.
- **prefill tok/s**: prompt tokens / seconds of one forward over the prompt with the KV cache on, best of reps.
  **decode tok/s**: new tokens / seconds of the greedy loop (one token per forward from the cache), best of reps.
- **tokens = fp32**: how many of the greedy tokens agree with the float32 original's before the first difference.
- **layers**: the classes of the leaf modules holding weights, which tells packed modules from float ones.
- Targets (issue 21): memory <= 1.05 x stored; at 4 bits decode >= the bfloat16 original's and >= the fastest peer
  whose quantized linears hold equal or more bits/param; qlr decode time <= 1.3 x its backbone alone (qlr --rank 0 at
  the same b0: the same modules without their correction).
"""


def notes(doc: dict) -> str:
    env = doc["env"]
    return "\n".join([
        f"# Runtime benchmark notes ({env['date'][:10]})", "",
        f"Run {env['date']} to {doc['env_end']['date']} with `{env['command']}` at tree {env['git']}.", "",
        f"Machine: {env['cpu']} ({env['isa']}), {env['cores']} cores, {env['mem_gib']} GiB RAM, torch threads "
        f"{env['threads']}; device {env['device']}. Load average {env['loadavg']} at the start and "
        f"{doc['env_end']['loadavg']} at the end"
        + (" (other work was running: timings are noisy and preliminary)." if max(env["loadavg"]) > env["cores"] * 0.5
           else "."), "",
        *[f"- {m['model']}: {m['description']}" + (f" {m['note']}." if m.get("note") else "") for m in doc["models"]],
        "", *([doc["note"], ""] if doc.get("note") else []), MEANINGS, *([PEER_NOTES] if doc.get("peer_setup") else []),
        "Tables: results.md; every measurement: results.json.", ""])


# ---------------------------------------------------------------------------------------------------------------
# Driver


def environment(mode_name: str, device: str, args, argv: list[str]) -> dict:
    import torch
    import transformers
    from machine import machine_facts

    facts = machine_facts(ROOT)
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    mode = MODES[mode_name]
    return {"kind": "env", "mode": mode_name, "date": dt.datetime.now().isoformat(timespec="seconds"),
            "command": "python scripts/bench_runtime.py " + " ".join(argv), "device": device, "cpu": facts["cpu"],
            "isa": torch.backends.cpu.get_cpu_capability(), "cores": facts["cores"], "mem_gib": round(mem, 1),
            "threads": args.threads or torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": facts["python"], "git": facts["git"],
            "loadavg": facts["loadavg"], "prefill": mode.prefill, "decode": mode.decode,
            "reps": mode.reps, "loader": args.loader, "calibration": {"samples": mode.samples, "seq_len": mode.seq_len}}


def setup_peers(venv: Path) -> dict:
    """A venv for the peers that sees the product venv's torch and transformers (a .pth file) and installs each peer
    with --no-deps into itself, so no peer can replace torch (2.13.0 CPU) or become a dependency of the product."""
    site = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    own = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    (own / "_product_venv.pth").write_text(str(site) + "\n")
    out = {}
    for name, pkgs in PEERS.items():
        env = {**os.environ, "DISABLE_CUDA": "1"}  # hqq: skip building its CUDA extension
        proc = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-deps", *pkgs], capture_output=True,
                              text=True, env=env, check=False)
        err = [ln for ln in proc.stderr.splitlines() if ln.strip() and "ignored" not in ln]
        out[name] = "installed" if proc.returncode == 0 else f"failed: {(err or ['?'])[-1][:300]}"
        log(f"peer {name}: {out[name]}")
    return out


def peer_status(python: str | None) -> dict:
    """Which peers import in the peers venv, with their versions, and the torch it runs."""
    if not python or not Path(python).exists():
        return {"venv": f"not found ({python}); run --setup-peers"}
    code = ("import json, importlib.metadata as md, torch\nout={'torch': torch.__version__}\n"
            "for n, mod in (('hqq','hqq.core.quantize'),('torchao','torchao'),('bitsandbytes','bitsandbytes')):\n"
            "    try:\n        __import__(mod); out[n] = md.version(n)\n"
            "    except Exception as e:\n        out[n] = 'not importable: %s: %s' % (type(e).__name__, str(e)[:200])\n"
            "print(json.dumps(out))")
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, check=False, timeout=600)
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"venv": f"{python} failed: {proc.stderr.strip()[-300:]}"}


def models_for(args, mode_name: str, work: Path) -> list[dict]:
    out = []
    if mode_name == "tiny":
        import importlib

        from lplr_convert.io.reader import BUNDLED

        tok_dir = Path(importlib.import_module(BUNDLED["all-MiniLM-L6-v2"]).__file__).parent / "model"
        src = write_llama(work / "tiny" / "src", TINY["num_hidden_layers"], TINY, tokenizer_from=tok_dir)
        return [{"model": "tiny", "src": src, "description": "a tiny random LlamaForCausalLM (hidden 64, 2 blocks, "
                 "all-MiniLM-L6-v2's tokenizer), float32: the smoke test's model"}]
    for name in args.models.split(","):
        if name == "smollm2":
            if not (args.smollm2 / "config.json").is_file():
                log(f"smollm2: {args.smollm2} has no config.json; skipped (pass --smollm2 DIR)")
                continue
            out.append({"model": "smollm2", "src": args.smollm2, "note": SMOLLM2_NOTE,
                        "description": "SmolLM2-135M-Instruct (LlamaForCausalLM, 30 blocks, hidden 576, tied "
                                       "embeddings, 134.5M parameters), float32 safetensors"})
        elif name == "llama7b-blocks":
            n = args.llama_layers
            src = write_llama(work / f"llama7b-blocks-{n}" / "src", n, LLAMA7B)
            out.append({"model": "llama7b-blocks", "src": src,
                        "description": f"LlamaForCausalLM with LLaMA-7B's block shapes (hidden 4096, intermediate "
                                       f"11008, 32 heads) and {n} blocks, vocabulary 1024 (LLaMA-7B: 32 blocks, "
                                       f"32000), random weights (seed {SEED}), float32 safetensors"})
        else:
            sys.exit(f"bench_runtime: unknown model {name!r}; choose from smollm2, llama7b-blocks")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2,llama7b-blocks", help="comma-separated: smollm2, llama7b-blocks")
    ap.add_argument("--configs", help="comma-separated configurations, MODEL:CONFIG for one model only (default: "
                                      "all that apply); "
                                      f"choose from {', '.join(CONFIGS)}")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in every measurement (default: cores)")
    ap.add_argument("--quick", action="store_true", help="the real models with few tokens: a smoke run")
    ap.add_argument("--tiny", action="store_true", help="a tiny random model, no peers: seconds (the test's mode)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    ap.add_argument("--reps", type=int, default=None, help="timed prefill+decode repeats (best is reported)")
    ap.add_argument("--prefill", type=int, default=None, help="prompt tokens (default 512; --quick 64)")
    ap.add_argument("--decode", type=int, default=None, help="greedy new tokens (default 64; --quick 8)")
    ap.add_argument("--llama-layers", type=int, default=4, help="decoder blocks of the LLaMA-7B-shaped model")
    ap.add_argument("--loader", default="load-model", choices=("load-model", "from-pretrained"),
                    help="how our conversions are loaded")
    ap.add_argument("--ours-dtype", default="bfloat16", choices=("float32", "bfloat16"),
                    help="dtype= for our loader where a configuration names none (rtn-4: float32, rtn-4-bf16: "
                         "bfloat16; the others: this, bfloat16 by default, the dtype to run 4-bit weights in on a "
                         "CPU)")
    ap.add_argument("--peer-dtype", default="bfloat16", choices=("float32", "bfloat16"),
                    help="the float model the peers quantize, and their compute dtype")
    ap.add_argument("--smollm2", type=Path, default=DEFAULT_SMOLLM2, help="SmolLM2-135M float32 safetensors dir")
    ap.add_argument("--work-dir", type=Path, default=DEFAULT_WORK,
                    help="cache of sources, calibration statistics and conversions (reused when complete)")
    ap.add_argument("--peers-venv", type=Path, default=DEFAULT_PEERS_VENV, help="the peers' venv")
    ap.add_argument("--no-peers", action="store_true", help="skip HQQ, torchao and bitsandbytes")
    ap.add_argument("--setup-peers", action="store_true", help="build --peers-venv and exit")
    ap.add_argument("--write", type=Path, default=None,
                    help="directory for results.json, results.md and NOTES.md (default: artifacts/runtime for a "
                         "full run; nothing for --quick/--tiny)")
    ap.add_argument("--note", default=None, help="a remark for NOTES.md (e.g. what else ran on the machine)")
    ap.add_argument("--reconvert", action="store_true",
                    help="convert again even where --work-dir holds a complete output made by the same command")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds for one configuration's measurement")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        for job in json.loads(args.worker):
            print(json.dumps(worker(job)), flush=True)
        return 0
    if args.setup_peers:
        print(json.dumps(setup_peers(args.peers_venv)))
        print(json.dumps(peer_status(str(args.peers_venv / "bin" / "python"))))
        return 0

    global RECONVERT
    RECONVERT = args.reconvert
    mode_name = "tiny" if args.tiny else "quick" if args.quick else "full"
    mode = MODES[mode_name]
    mode = replace(mode, **{k: v for k, v in (("reps", args.reps), ("prefill", args.prefill),
                                              ("decode", args.decode)) if v is not None})
    MODES[mode_name] = mode
    device = pick_device(args.device)
    out_dir = args.write or (DEFAULT_OUT if mode_name == "full" else None)
    work = args.work_dir / ("tiny" if args.tiny else "")
    if args.tiny and args.write:
        work = args.write / "work"
    work.mkdir(parents=True, exist_ok=True)
    env = environment(mode_name, device, args, argv)
    print(json.dumps(env), flush=True)
    peers_python = None if args.tiny or args.no_peers else str(args.peers_venv / "bin" / "python")
    peer_setup = peer_status(peers_python) if peers_python else {}
    env["peers"] = ", ".join(f"{k} {v}" for k, v in peer_setup.items()) if peer_setup else None
    wanted_all = args.configs.split(",") if args.configs else None
    for c in wanted_all or ():
        if c.rpartition(":")[2] not in CONFIGS:
            sys.exit(f"bench_runtime: unknown configuration {c!r}; choose from {', '.join(CONFIGS)}")
    models = models_for(args, mode_name, work)
    runs: list[dict] = []
    for m in models:
        src = Path(m["src"])
        mwork = src.parent if m["model"] != "smollm2" else work / "smollm2"
        mwork.mkdir(parents=True, exist_ok=True)
        wanted = None if wanted_all is None else \
            [c.rpartition(":")[2] for c in wanted_all if c.rpartition(":")[0] in ("", m["model"])]
        names = [c for c in DEFAULT_CONFIGS[m["model"]] if wanted is None or c in wanted]
        if wanted:
            names += [c for c in wanted if c not in names]
        if peers_python is None:
            names = [c for c in names if CONFIGS[c].kind != "peer"]
        cfgs = [CONFIGS[c] for c in names]
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(str(src)).vocab_size
        params = stored_tensor_bytes(src)[1]
        prompt, prompt_source = prompt_ids(src, mode.prefill, vocab)
        m["prompt"] = prompt_source
        m["params"] = params
        has_tok = (src / "tokenizer.json").is_file() or (src / "tokenizer_config.json").is_file()
        stats = None
        done: dict[str, Path] = {}
        prepared: list[tuple[dict, str | None, dict]] = []  # (job, interpreter, extra) or a failed record
        for cfg in cfgs:  # conversions first, so that no measurement shares the machine with one
            job = {"model": m["model"], "config": cfg.name, "kind": cfg.kind, "device": device,
                   "threads": args.threads, "prompt": prompt, "decode": mode.decode, "reps": mode.reps,
                   "loader": args.loader, "src": str(src)}
            try:
                if cfg.kind == "ours":
                    if cfg.calibrated and has_tok and stats is None:
                        stats = calibrate(src, mwork, mode, device, args.tiny)
                    for dep in filter(None, (cfg.backbone_of, cfg.same_as)):
                        if dep not in done:
                            raise RuntimeError(f"{dep} was not converted; add it to --configs before {cfg.name}")
                    if cfg.same_as:
                        path = done[cfg.same_as]
                    else:
                        path = convert(cfg, src, mwork, stats if has_tok else None, device, args.threads, args.tiny,
                                       done)
                    done[cfg.name] = path
                    lb, share = linear_bits_stored(path)
                    calibrated = CONFIGS[cfg.same_as or cfg.name].calibrated and has_tok
                    extra = {"path": str(path), "dtype": cfg.dtype or args.ours_dtype, "linear_bits": lb,
                             "compressed_share": share, "calibrated": calibrated,
                             "stored_bytes": stored_tensor_bytes(path)[0]}
                    prepared.append(({**job, **extra}, sys.executable, extra))
                elif cfg.kind == "original":
                    extra = {"dtype": cfg.dtype, "linear_bits": 32.0 if cfg.dtype == "float32" else 16.0,
                             "stored_bytes": params * (4 if cfg.dtype == "float32" else 2)}
                    prepared.append(({**job, **extra}, sys.executable, extra))
                else:
                    extra = {"peer": cfg.peer, "backend": cfg.backend, "dtype": args.peer_dtype}
                    prepared.append(({**job, **extra}, peers_python, extra))
            except Exception as e:  # noqa: BLE001  (a failed conversion is a record; the run goes on)
                prepared.append((job, None, {"error": f"conversion: {e}"}))
        batches: list[list[tuple[dict, str | None, dict]]] = []
        for item in prepared:  # the tiny mode: consecutive jobs of one interpreter share a process
            if args.tiny and batches and item[1] is not None and batches[-1][0][1] == item[1]:
                batches[-1].append(item)
            else:
                batches.append([item])
        for batch in batches:
            python = batch[0][1]
            if python is None:
                recs = [_failed(job, extra["error"]) for job, _, extra in batch]
            else:
                log(f"{m['model']} {', '.join(j['config'] for j, _, _ in batch)}: measuring in a fresh process")
                recs = run_jobs([j for j, _, _ in batch], python, args.timeout)
            for rec, (_, _, extra) in zip(recs, batch):
                rec |= {k: v for k, v in extra.items() if k not in rec and k not in ("dtype", "error")}
                rec["params"] = params
                print(json.dumps(rec), flush=True)
                if rec.get("status") == "ok":
                    log(f"  {rec['config']}: held {rec['held_bytes'] / 1e6:.1f} MB, RSS after run "
                        f"{rec['rss_end_bytes'] / 1e6:.0f} MB, prefill {rec['prefill_tok_s']:.1f} tok/s, decode "
                        f"{rec['decode_tok_s']:.2f} tok/s")
                else:
                    log(f"  {rec['config']}: {rec.get('error')}")
                runs.append(rec)
    targets = derive(runs)
    for t in targets:
        print(json.dumps(t), flush=True)
    doc = {"env": env, "env_end": {"date": dt.datetime.now().isoformat(timespec="seconds"),
                                   "loadavg": [round(x, 2) for x in os.getloadavg()]},
           "models": models, "runs": runs, "targets": targets, "peer_setup": peer_setup, "note": args.note}
    for m in doc["models"]:
        m["src"] = str(m["src"])
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
        (out_dir / "results.md").write_text(markdown(doc))
        (out_dir / "NOTES.md").write_text(notes(doc))
        log(f"wrote {out_dir / 'results.json'}, results.md and NOTES.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
