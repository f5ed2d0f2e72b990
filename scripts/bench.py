#!/usr/bin/env python
"""Benchmark lplr-convert against the faithful re-implementation of the published LPLR (issue 5).

One run measures, on one device:

1. the fp32 matmul rate (best of a few n x n GEMMs), the yardstick for flop efficiency;
2. time, relative error and peak memory of our lplr, lsvd and laser on LLaMA-7B shapes (fp16 input);
3. the same for ``scripts/reference_lplr.py`` (lplr, lsvd), the speed-up reference/ours and the error ratio
   ours/reference with the tensor quantizer and the same sketch (same seed), and our lplr flop efficiency;
4. peak resident memory of a whole ``lplr-convert`` conversion of a synthetic multi-shard LLaMA checkpoint, with small
   and with large output shards, above the interpreter-plus-torch baseline;
5. end to end, each command a fresh process, interleaved and best of the mode's repeats: the whole CLI on a checkpoint
   of one matrix (lplr, f = 0.8, 8/8 bits) with the default report and with ``--no-report`` against a process running
   ``scripts/reference_lplr.py`` on the same file (load, sketch, LPLR, error), the report's overhead, and
   ``--workers 2`` against ``--workers 1`` on the multi-tensor checkpoint of (4).

Every per-matrix measurement runs in a fresh subprocess: the weight is loaded, a small warm-up call initialises the
kernels, the kernel's peak-RSS counter is reset (``/proc/self/clear_refs`` = 5), and peak memory is VmHWM after the
call minus VmRSS before it (the fp16 input is resident before, so it is not counted). Where the reset is not allowed a
1 ms VmRSS sampling thread is used instead; each record names its method. On CUDA the device peak
(``torch.cuda.max_memory_allocated``) is reported too and timings are bracketed by ``torch.cuda.synchronize``.

Usage::

    python scripts/bench.py                 # full run: writes artifacts/bench/results.jsonl and results.md
    python scripts/bench.py --quick         # < 1 min on 2 cores, prints JSON lines only
    python scripts/bench.py --tiny          # seconds; the smoke test's mode
    python scripts/bench.py --device cuda   # or auto; the reference always runs on the CPU (as published)
    python scripts/bench.py --e2e-only      # only (5): whole-process times, report overhead, workers

Each measurement is printed as one JSON object per line on stdout as soon as it exists; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REFERENCE_PATH = ROOT / "scripts" / "reference_lplr.py"
DEFAULT_OUT = ROOT / "artifacts" / "bench"
SEED = 1234
# Synthetic weights: W = U diag(sigma) V^T, U and V Haar-orthonormal (reduced QR of seeded Gaussians),
# sigma_i = (1 + i / K0) ** -ALPHA scaled so that the entries' RMS is RMS, rounded to fp16.
ALPHA, K0, RMS = 0.6, 16, 0.02
SPECTRUM = (f"W = U diag(s) V^T, U, V from the reduced QR of Gaussians drawn with torch.Generator seed {SEED} "
            f"(+ shape), s_i = (1 + i/{K0})^-{ALPHA} scaled to entry RMS {RMS}, cast to fp16")
FLOPS_FORMULA = ("lplr useful flops = 2mnr (W S) + mr^2 (L^T L, symmetric: one triangle) + 2mrn (L^T W) + r^3/3 "
                 "(Cholesky) + 2r^2n (two triangular solves) + 2r^2n (error's G R) = 4mnr + mr^2 + r^3/3 + 4r^2n")
OURS = (("lplr", "tensor"), ("lplr", "channel"), ("lsvd", "tensor"), ("lsvd", "channel"))
REFERENCE = ("lplr", "lsvd")


@dataclass(frozen=True)
class Mode:
    shapes: tuple[tuple[int, int], ...]
    fractions: tuple[float, ...]
    bits: tuple[int, ...]
    matmul_n: int
    matmul_reps: int
    checkpoint: dict  # hidden, intermediate, layers, vocab of the synthetic LLaMA checkpoint
    shard_sizes: tuple[int, int]  # small and large --max-shard-size in bytes
    profile: bool
    fresh: bool = True  # one subprocess per measurement (False: one subprocess runs them all, for --tiny)
    e2e_shape: tuple[int, int] = (11008, 4096)  # the one matrix of the end-to-end checkpoint
    e2e_reps: int = 2  # interleaved repeats of each end-to-end command (the best is reported)


MODES = {
    "full": Mode(((4096, 4096), (11008, 4096)), (0.8, 0.25), (8, 4), 4096, 3,
                 {"hidden": 4096, "intermediate": 11008, "layers": 2, "vocab": 32000},
                 (100_000_000, 50_000_000_000), True),
    "quick": Mode(((2752, 1024),), (0.8,), (8,), 2048, 2,
                  {"hidden": 512, "intermediate": 1376, "layers": 2, "vocab": 2000},
                  (1_500_000, 50_000_000_000), False, fresh=False, e2e_shape=(2752, 1024), e2e_reps=1),
    "tiny": Mode(((192, 64),), (0.5,), (4,), 256, 2,
                 {"hidden": 64, "intermediate": 176, "layers": 1, "vocab": 128},
                 (40_000, 50_000_000_000), False, fresh=False, e2e_shape=(192, 64), e2e_reps=1),
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def lplr_flops(m: int, n: int, r: int) -> float:
    """Useful flops of LPLR on an m x n matrix at rank r (see FLOPS_FORMULA)."""
    return 4 * m * n * r + m * r * r + r ** 3 / 3 + 4 * r * r * n


# ---------------------------------------------------------------------------------------------------------------
# Memory probes (Linux /proc) and device helpers


def proc_status() -> dict[str, int]:
    """VmRSS and VmHWM of this process in bytes, and VmRSS's anonymous and file-backed shares (RssAnon, RssFile)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:", "RssAnon:", "RssFile:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class RssSampler:
    """Fallback peak-RSS probe: a thread reading VmRSS every `interval` seconds."""

    def __init__(self, interval: float = 0.001):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, proc_status()["VmRSS"])
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = proc_status()["VmRSS"]
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, proc_status()["VmRSS"])


def pick_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        sys.exit("bench: --device cuda but torch sees no CUDA device; use --device cpu or auto")
    return name


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def matmul_rate(n: int, reps: int, device: str) -> dict:
    """Best fp32 GEMM rate over `reps` n x n products (after one warm-up)."""
    import torch

    gen = torch.Generator().manual_seed(SEED)
    a = torch.randn(n, n, generator=gen).to(device)
    b = torch.randn(n, n, generator=gen).to(device)
    a @ b
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t0)
    best = min(times)
    return {"kind": "matmul", "n": n, "reps": reps, "seconds": times, "gflops": 2 * n ** 3 / best / 1e9}


# ---------------------------------------------------------------------------------------------------------------
# Synthetic weights and checkpoint


def synthetic_weight(m: int, n: int, seed: int = SEED):
    """The deterministic m x n fp16 weight with the decaying spectrum described in SPECTRUM."""
    import torch

    gen = torch.Generator().manual_seed(seed * 1_000_003 + m * 7919 + n)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=gen))
    s = (1 + torch.arange(k, dtype=torch.float64) / K0) ** -ALPHA
    s = (s * math.sqrt(m * n * RMS ** 2 / float(s.square().sum()))).float()
    return ((U * s) @ V.T).half()


def write_checkpoint(path: Path, cfg: dict, weights: dict) -> dict:
    """A multi-shard fp16 LLaMA checkpoint: embeddings, one shard per block, then norm and lm_head.

    Block matrices are row/column permutations of the shape's synthetic weight (same spectrum, no extra QR).
    Returns the largest tensor's numel and the number of input shards.
    """
    import torch
    from safetensors.torch import save_file

    h, i, vocab = cfg["hidden"], cfg["intermediate"], cfg["vocab"]
    gen = torch.Generator().manual_seed(SEED)

    def block(m, n):
        if (m, n) not in weights and (n, m) not in weights:
            weights[(m, n)] = synthetic_weight(m, n)
        base = weights[(m, n)] if (m, n) in weights else weights[(n, m)].T
        rows, cols = torch.randperm(m, generator=gen), torch.randperm(n, generator=gen)
        return base[rows][:, cols].contiguous()

    shards = [{"model.embed_tokens.weight": (torch.randn(vocab, h, generator=gen) * RMS).half()}]
    for layer in range(cfg["layers"]):
        p = f"model.layers.{layer}."
        t = {p + f"self_attn.{x}_proj.weight": block(h, h) for x in "qkvo"}
        t[p + "mlp.gate_proj.weight"] = block(i, h)
        t[p + "mlp.up_proj.weight"] = block(i, h)
        t[p + "mlp.down_proj.weight"] = block(h, i)
        t[p + "input_layernorm.weight"] = torch.ones(h, dtype=torch.float16)
        t[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.float16)
        shards.append(t)
    shards.append({"model.norm.weight": torch.ones(h, dtype=torch.float16),
                   "lm_head.weight": (torch.randn(vocab, h, generator=gen) * RMS).half()})
    path.mkdir(parents=True, exist_ok=True)
    weight_map, total, largest = {}, 0, 0
    for k, tensors in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(path / fname), metadata={"format": "pt"})
        for name, t in tensors.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
            largest = max(largest, t.numel())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
              "intermediate_size": i, "num_hidden_layers": cfg["layers"], "num_attention_heads": max(1, h // 128),
              "num_key_value_heads": max(1, h // 128), "vocab_size": vocab, "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "float16"}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    largest_block = max(h * h, i * h)
    return {"largest_numel": largest, "largest_block_numel": largest_block, "input_shards": len(shards),
            "input_bytes": total}


# ---------------------------------------------------------------------------------------------------------------
# Worker: one measurement in a fresh interpreter


def load_reference():
    spec = importlib.util.spec_from_file_location("reference_lplr", REFERENCE_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_call(job: dict):
    """A function W -> (rel_error, rank) running the job's method on W."""
    from lplr_convert.math.error import relative_error
    from lplr_convert.math.sketch import sketch_matrix
    from lplr_convert.methods import RankPolicy, get_method, make_settings, resolve_rank

    policy = RankPolicy("rank_fraction", job["fraction"])
    if job["impl"] == "ours":
        bits = job["bits"] or 8  # laser ignores bits and quantizer
        # The published grid and arithmetic, as the reference uses: a float32 sketch product (the CLI's default
        # takes bfloat16 where the CPU has it, which the end-to-end measurement times).
        extra = {"sketch_precision": "float32"} if job["method"] == "lplr" else {}
        settings = make_settings(method=job["method"], b1=bits, b2=bits, quantizer=job["quantizer"] or "channel",
                                  scheme="minmax", rank=policy, **extra)
        method = get_method(job["method"])

        def call(W):
            res = method.compress(W, settings, job["seed"])
            return res.error(), res.rank  # the error inside the timed call, as the reference computes its own
        return call, None

    ref = load_reference()

    def call(W):
        m, n = W.shape
        r = resolve_rank(policy, m, n)
        if job["method"] == "lplr":
            # the sketch ours draws on this device (a CUDA generator draws other numbers than the CPU one)
            W_hat = ref.lplr(W, r, job["bits"], job["bits"], sketch_matrix(n, r, job["seed"], device=W.device))
        else:
            W_hat = ref.lsvd(W, r, job["bits"], job["bits"])
        return W_hat, r

    def error(W, W_hat):
        return relative_error(W.detach().cpu().float(), W_hat)
    return call, error


def profile_call(call, W, device: str, top: int = 14) -> dict:
    """Wall time of one call under torch.profiler, its top operators by self time (with and without shapes)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    t0 = time.perf_counter()
    with profile(activities=acts, record_shapes=True) as prof:
        call(W)
        sync(device)
    wall = time.perf_counter() - t0
    attr = "self_device_time_total" if device.startswith("cuda") else "self_cpu_time_total"

    def rows(events, shapes):
        events = sorted(events, key=lambda e: getattr(e, attr), reverse=True)
        total = sum(getattr(e, attr) for e in events) or 1.0
        return [{"op": e.key, **({"shapes": str(e.input_shapes)[:120]} if shapes else {}), "calls": e.count,
                 "self_seconds": getattr(e, attr) / 1e6, "share": getattr(e, attr) / total} for e in events[:top]]

    return {"wall_seconds": wall, "top_ops": rows(prof.key_averages(group_by_input_shape=True), True),
            "by_op": rows(prof.key_averages(), False)}


def worker(job: dict) -> dict:
    import torch
    from safetensors.torch import load_file

    device = job["device"]
    W = load_file(job["weight"])["weight"].to(device)
    call, error = make_call(job)
    call(W[:128, :64].contiguous())  # warm-up: thread pools, LAPACK, lazy imports
    # The machine is shared: the GEMM rate right before the call says how much of it this measurement got.
    local_rate = matmul_rate(job["matmul_n"], 2, device)["gflops"] if job.get("matmul_n") else None
    out = {"kind": "profile" if job.get("profile") else "matrix", **{k: job[k] for k in
           ("impl", "method", "quantizer", "bits", "fraction", "seed", "device")}, "shape": list(W.shape)}
    if job.get("profile"):
        out.update(profile_call(call, W, device))
        return out
    times, peak, mem_method, dev_peak = [], None, None, None
    for rep in range(job["reps"]):
        result = None
        gc.collect()
        before = proc_status()["VmRSS"]
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            dev_before = torch.cuda.memory_allocated()
        exact = reset_peak_rss()
        sampler = None if exact else RssSampler().__enter__()
        sync(device)
        t0 = time.perf_counter()
        result, rank = call(W)
        sync(device)
        times.append(time.perf_counter() - t0)
        if sampler is not None:
            sampler.__exit__(None, None, None)
        if rep == 0:
            high = proc_status()["VmHWM"] if exact else sampler.peak
            peak = high - before
            mem_method = "VmHWM reset via clear_refs" if exact else "VmRSS sampled every 1 ms"
            if device.startswith("cuda"):
                dev_peak = torch.cuda.max_memory_allocated() - dev_before
            rel = float(error(W, result) if error else result)
        del result
    m, n = W.shape
    fp32 = m * n * 4
    out.update(rank=rank, seconds=min(times), seconds_all=times, rel_error=rel, peak_bytes=peak,
               peak_x_fp32=peak / fp32, mem_method=mem_method, device_peak_bytes=dev_peak,
               input_dtype=str(W.dtype).removeprefix("torch."), local_matmul_gflops=local_rate)
    if job["method"] == "lplr":
        out["flops"] = lplr_flops(m, n, rank)
        out["gflops"] = out["flops"] / out["seconds"] / 1e9
        out["local_efficiency"] = out["gflops"] / local_rate if local_rate else None
    return out


def run_workers(jobs: list[dict], timeout: float = 3600) -> list[dict]:
    """Run `jobs` one after another in one fresh subprocess; one record per job (failed ones say why)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(jobs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False)
    done = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    out = [{**rec, "status": "ok", "isolation": "fresh process" if len(jobs) == 1 else "shared process"}
           for rec in done]
    out += [{"kind": "profile" if job.get("profile") else "matrix", "status": "failed", **job, "error": tail}
            for job in jobs[len(done):]]
    return out


# ---------------------------------------------------------------------------------------------------------------
# Conversion memory


# A small launcher between the benchmark and the measured command: ru_maxrss of a child counts the memory of the
# process it was forked from (the pre-exec image), so the measured command must be forked from a small process, not
# from this one (which holds torch and the synthetic weights). The launcher is ~10 MB, far below any baseline.
_LAUNCHER = """
import json, os, subprocess, sys, time
t0 = time.perf_counter()
proc = subprocess.Popen(sys.argv[2:])
peaks = {"RssAnon": 0, "RssFile": 0, "RssShmem": 0}
while True:  # wait4 without reaping early; meanwhile sample the RSS split every 20 ms
    pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
    if pid:
        break
    try:
        with open(f"/proc/{proc.pid}/status") as f:
            for line in f:
                key = line.split(":")[0]
                if key in peaks:
                    peaks[key] = max(peaks[key], int(line.split()[1]))
    except (OSError, ValueError, IndexError):
        pass
    time.sleep(0.02)
with open(sys.argv[1], "w") as f:
    json.dump({"rc": os.waitstatus_to_exitcode(status), "maxrss_kb": usage.ru_maxrss,
               "seconds": time.perf_counter() - t0, "sampled_peak_kb": peaks}, f)
"""


def peak_rss_of(cmd: list[str], log_dir: Path, tag: str, timeout: float = 3600) -> dict:
    """Run `cmd` (through the launcher); its exit code, wall time and peak RSS (wait4 ru_maxrss of exactly it)."""
    result = log_dir / f"{tag}.json"
    with open(log_dir / f"{tag}.out", "w") as out_f, open(log_dir / f"{tag}.err", "w") as err_f:
        subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, str(result), *cmd], stdout=out_f, stderr=err_f,
                       cwd=ROOT, timeout=timeout, check=False)
    stderr = (log_dir / f"{tag}.err").read_text(errors="replace").strip().splitlines()
    if not result.exists():
        return {"rc": -1, "seconds": None, "peak_rss_bytes": None, "stderr_tail": stderr[-1] if stderr else ""}
    res = json.loads(result.read_text())
    return {"rc": res["rc"], "seconds": res["seconds"], "peak_rss_bytes": res["maxrss_kb"] * 1024,
            "sampled_peak_anon_bytes": res["sampled_peak_kb"]["RssAnon"] * 1024,
            "sampled_peak_file_bytes": res["sampled_peak_kb"]["RssFile"] * 1024,
            "stderr_tail": stderr[-1] if stderr else ""}


def convert_command() -> list[str]:
    """The CLI as installed (`lplr-convert`, whose default command is `convert`), else `python -m lplr_convert.cli`."""
    exe = Path(sys.executable).with_name("lplr-convert")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "lplr_convert.cli"]


def bench_conversion(mode: Mode, weights: dict, work: Path, device: str = "cpu") -> list[dict]:
    """Peak RSS of whole conversions (small and large shards) above the import baseline.

    Peak RSS is per process, so when `mode.fresh` is False (--tiny, --quick) the three processes run concurrently
    to save time (their wall times then overlap; only the memory figures are meant).
    """
    from concurrent.futures import ThreadPoolExecutor

    info = write_checkpoint(work / "ckpt", mode.checkpoint, weights)
    prefix = convert_command()
    cmds = {"baseline": [sys.executable, "-c", "import torch, lplr_convert"]}
    for label, size in zip(("small", "large"), mode.shard_sizes):
        cmds[label] = prefix + ["--in-path", str(work / "ckpt"), "--out-path", str(work / f"out-{label}"),
                                "--rank-fraction", "0.8", "--max-shard-size", str(size), "--device", device]
    with ThreadPoolExecutor(max_workers=1 if mode.fresh else len(cmds)) as pool:
        runs = dict(zip(cmds, pool.map(lambda kv: peak_rss_of(kv[1], work, f"convert-{kv[0]}"), cmds.items())))
    base = runs["baseline"]
    largest_fp32 = info["largest_numel"] * 4
    block_fp32 = info["largest_block_numel"] * 4
    common = {"kind": "convert", "checkpoint": mode.checkpoint, **info, "baseline_rss_bytes": base["peak_rss_bytes"],
              "largest_fp32_bytes": largest_fp32, "largest_block_fp32_bytes": block_fp32,
              "baseline": "peak RSS of `python -c 'import torch, lplr_convert'` (wait4 ru_maxrss, launched from a "
                          "small process)", "concurrent": not mode.fresh}
    records = []
    for label, size in zip(("small", "large"), mode.shard_sizes):
        run, out = runs[label], work / f"out-{label}"
        rec = {**common, "shards": label, "max_shard_size": size, "command": " ".join(cmds[label]),
               "seconds": run["seconds"], "peak_rss_bytes": run["peak_rss_bytes"],
               "sampled_peak_anon_bytes": run["sampled_peak_anon_bytes"],
               "sampled_peak_file_bytes": run["sampled_peak_file_bytes"],
               "baseline_anon_bytes": base["sampled_peak_anon_bytes"], "baseline_file_bytes": base["sampled_peak_file_bytes"]}
        if run["rc"] != 0:
            records.append({**rec, "status": "pending", "reason": f"exit code {run['rc']}: {run['stderr_tail']}"})
            continue
        above = run["peak_rss_bytes"] - base["peak_rss_bytes"]
        rec.update(status="ok", above_baseline_bytes=above, x_largest_fp32=above / largest_fp32,
                   x_largest_block_fp32=above / block_fp32,
                   output_shards=len(list(out.glob("*.safetensors"))))
        try:
            from lplr_convert.io.manifest import read_manifest

            read_manifest(out)
            rec["manifest_complete"] = True
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            rec["manifest_complete"] = False
            rec["manifest_error"] = str(exc)[:200]
        records.append(rec)
        shutil.rmtree(out, ignore_errors=True)
    return records


# ---------------------------------------------------------------------------------------------------------------
# End to end: whole processes


# What a user of the published code runs for one matrix: load it, draw the Gaussian sketch, LPLR, the error.
_REFERENCE_PROCESS = r"""
import importlib.util, math, sys
import torch
from safetensors.torch import load_file
spec = importlib.util.spec_from_file_location("reference_lplr", sys.argv[1])
ref = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ref)
W = next(iter(load_file(sys.argv[2]).values()))
m, n = W.shape
r = math.ceil(float(sys.argv[3]) * min(m, n))
torch.manual_seed(int(sys.argv[5]))
S = torch.randn(n, r) / math.sqrt(r)
W_hat = ref.lplr(W, r, int(sys.argv[4]), int(sys.argv[4]), S)
print(ref.rel_error(W, W_hat))
"""
E2E_FRACTION, E2E_BITS = 0.8, 8


def _timed(cmd: list[str], timeout: float = 3600) -> dict:
    """Wall time of a fresh process (startup and imports included), its exit code, and the report time it logged."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout, check=False)
    seconds = time.perf_counter() - t0
    report = [ln for ln in proc.stderr.splitlines() if "report written to" in ln]
    report_s = float(report[-1].rsplit(" in ", 1)[1].split()[0]) if report and " in " in report[-1] else None
    tail = (proc.stderr.strip().splitlines() or [""])[-1]
    return {"rc": proc.returncode, "seconds": seconds, "report_seconds": report_s, "stderr_tail": tail[-300:]}


def _best_runs(cmds: dict[str, list[str]], reps: int) -> dict[str, dict]:
    """Run every command `reps` times, interleaved (so that a change of load hits all alike); the best run of each,
    with all its times."""
    runs: dict[str, list[dict]] = {k: [] for k in cmds}
    for rep in range(reps):
        for key, cmd in cmds.items():
            log(f"end to end: {key} ({rep + 1}/{reps})")
            runs[key].append(_timed(cmd))
    out = {}
    for key, rs in runs.items():
        ok = [r for r in rs if r["rc"] == 0]
        best = min(ok, key=lambda r: r["seconds"]) if ok else rs[-1]
        out[key] = {**best, "all_seconds": [round(r["seconds"], 3) for r in rs], "ok": bool(ok)}
    return out


def bench_end_to_end(mode: Mode, weights: dict, work: Path, device: str = "cpu") -> list[dict]:
    """Whole-CLI time of one matrix with and without the report against the reference process, and --workers 2
    against --workers 1 on the multi-tensor checkpoint (see the module doc, item 5)."""
    from safetensors.torch import save_file

    m, n = mode.e2e_shape
    if (m, n) not in weights:
        weights[(m, n)] = synthetic_weight(m, n)
    one = work / "e2e-one"
    one.mkdir(exist_ok=True)
    save_file({"model.layers.0.mlp.up_proj.weight": weights[(m, n)]}, str(one / "model.safetensors"),
              metadata={"format": "pt"})
    (one / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    cli = convert_command() + ["--rank-fraction", str(E2E_FRACTION), "--b1", str(E2E_BITS), "--b2", str(E2E_BITS),
                               "--seed", str(SEED), "--device", device, "--overwrite"]
    cmds = {"cli_report": cli + ["--in-path", str(one), "--out-path", str(work / "e2e-report")],
            "cli_no_report": cli + ["--in-path", str(one), "--out-path", str(work / "e2e-noreport"), "--no-report"],
            "reference": [sys.executable, "-c", _REFERENCE_PROCESS, str(REFERENCE_PATH), str(one / "model.safetensors"),
                          str(E2E_FRACTION), str(E2E_BITS), str(SEED)]}
    load_before = [round(x, 2) for x in os.getloadavg()]
    runs = _best_runs(cmds, mode.e2e_reps)
    rec = {"kind": "e2e", "shape": [m, n], "fraction": E2E_FRACTION, "bits": E2E_BITS, "device": device,
           "reps": mode.e2e_reps, "loadavg_before": load_before, "loadavg_after": [round(x, 2) for x in os.getloadavg()],
           "runs": runs, "status": "ok" if all(r["ok"] for r in runs.values()) else "failed"}
    if rec["status"] == "ok":
        with_r, without, ref = (runs[k]["seconds"] for k in ("cli_report", "cli_no_report", "reference"))
        rec.update(speedup_with_report=ref / with_r, speedup_without_report=ref / without,
                   report_overhead=(with_r - without) / without,
                   report_seconds=runs["cli_report"]["report_seconds"],
                   report_share=(runs["cli_report"]["report_seconds"] or 0.0) / without)
    return [rec, bench_workers(mode, weights, work, device)]


def bench_workers(mode: Mode, weights: dict, work: Path, device: str = "cpu") -> dict:
    """--workers 2 against --workers 1 (each with its default threads: cores / workers) on the multi-tensor
    checkpoint, without the report."""
    ckpt = work / "ckpt"
    if not (ckpt / "config.json").exists():
        write_checkpoint(ckpt, mode.checkpoint, weights)
    cli = convert_command() + ["--in-path", str(ckpt), "--rank-fraction", str(E2E_FRACTION), "--seed", str(SEED),
                               "--device", device, "--no-report", "--overwrite"]
    cmds = {f"workers_{k}": cli + ["--out-path", str(work / f"e2e-workers-{k}"), "--workers", str(k)] for k in (1, 2)}
    load_before = [round(x, 2) for x in os.getloadavg()]
    runs = _best_runs(cmds, mode.e2e_reps)
    rec = {"kind": "e2e_workers", "checkpoint": mode.checkpoint, "device": device, "cores": os.cpu_count(),
           "reps": mode.e2e_reps, "loadavg_before": load_before,
           "loadavg_after": [round(x, 2) for x in os.getloadavg()], "runs": runs,
           "status": "ok" if all(r["ok"] for r in runs.values()) else "failed"}
    if rec["status"] == "ok":
        rec["speedup_2_over_1"] = runs["workers_1"]["seconds"] / runs["workers_2"]["seconds"]
    return rec


# ---------------------------------------------------------------------------------------------------------------
# Targets and report


def _find(records, **kw):
    for r in records:
        if r.get("status", "ok") == "ok" and all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def comparisons(records: list[dict]) -> list[dict]:
    """Ours (tensor quantizer) against the reference with the same rank, bits and seed."""
    out = []
    for ref in [r for r in records if r.get("kind") == "matrix" and r.get("impl") == "reference"
                and r.get("status") == "ok"]:
        key = {k: ref[k] for k in ("method", "shape", "fraction", "bits")}
        ours = _find(records, kind="matrix", impl="ours", quantizer="tensor", **key)
        if ours is None:
            continue
        out.append({"kind": "compare", **key, "quantizer": "tensor", "seed": ref["seed"], "rank": ours["rank"],
                    "ours_seconds": ours["seconds"], "reference_seconds": ref["seconds"],
                    "time_ratio_ours_over_reference": ours["seconds"] / ref["seconds"],
                    "speedup": ref["seconds"] / ours["seconds"],
                    "ours_rel_error": ours["rel_error"], "reference_rel_error": ref["rel_error"],
                    "error_ratio": ours["rel_error"] / ref["rel_error"],
                    "ours_peak_bytes": ours["peak_bytes"], "reference_peak_bytes": ref["peak_bytes"]})
        lo, lr = ours.get("local_matmul_gflops"), ref.get("local_matmul_gflops")
        if lo and lr:  # both times in units of "GEMM work at the rate this subprocess saw": corrects for load
            out[-1]["speedup_load_normalized"] = (ref["seconds"] * lr) / (ours["seconds"] * lo)
    return out


def _norm(c: dict) -> str:
    v = c.get("speedup_load_normalized")
    return "" if v is None else f"; {v:.2f}x after normalising each time by the matmul rate its subprocess saw"


def machine_rate(records: list[dict]) -> float:
    """The machine's fp32 matmul rate: the best of the run's yardstick and every rate measured inside the workers.

    On a shared machine a single measurement can be taken at a bad moment; the best rate seen during the run is the
    strict yardstick (efficiency against it is never flattered by a slow moment).
    """
    rates = [r["gflops"] for r in records if r["kind"] == "matmul"]
    rates += [r["local_matmul_gflops"] for r in records if r.get("local_matmul_gflops")]
    return max(rates)


def targets(records: list[dict], matmul_gflops: float) -> list[dict]:
    comps = [r for r in records if r["kind"] == "compare"]
    out = []

    def add(name, value, threshold, ok, detail):
        out.append({"kind": "target", "target": name, "value": value, "threshold": threshold,
                    "pass": bool(ok) if value is not None else None, "detail": detail})

    lplr_comps = [c for c in comps if c["method"] == "lplr" and c["fraction"] == 0.8]
    big = max((tuple(c["shape"]) for c in lplr_comps), key=lambda s: s[0] * s[1], default=None)
    for c in [c for c in lplr_comps if tuple(c["shape"]) == big]:
        tag = f"lplr f=0.8 {c['shape'][0]}x{c['shape'][1]} {c['bits']}-bit"
        add(f"{tag}: >= 3x faster than reference", c["speedup"], 3.0, c["speedup"] >= 3.0,
            f"ours {_s(c['ours_seconds'])} s vs reference {_s(c['reference_seconds'])} s{_norm(c)}")
        for q in ("tensor", "channel"):
            ours = _find(records, kind="matrix", impl="ours", method="lplr", quantizer=q, shape=c["shape"],
                         fraction=0.8, bits=c["bits"])
            if ours:
                eff = ours["gflops"] / matmul_gflops
                local = ours.get("local_matmul_gflops")
                add(f"{tag} ({q}): >= 75% of matmul rate", eff, 0.75, eff >= 0.75,
                    f"{ours['gflops']:.1f} GFLOP/s of {matmul_gflops:.1f}" + (
                        f"; {ours['gflops'] / local:.0%} of the {local:.1f} GFLOP/s measured in the same subprocess "
                        "just before" if local else ""))
    for c in [c for c in comps if c["method"] == "lsvd"]:
        add(f"lsvd f={c['fraction']} {c['shape'][0]}x{c['shape'][1]} {c['bits']}-bit: >= 2x faster than reference",
            c["speedup"], 2.0, c["speedup"] >= 2.0,
            f"ours {_s(c['ours_seconds'])} s vs reference {_s(c['reference_seconds'])} s{_norm(c)}")
    for c in comps:
        dev = abs(c["error_ratio"] - 1)
        add(f"{c['method']} f={c['fraction']} {c['shape'][0]}x{c['shape'][1]} {c['bits']}-bit: error within 1% of "
            f"reference", c["error_ratio"], "abs(ratio - 1) <= 0.01", dev <= 0.01,
            f"{c['ours_rel_error']:.5f} vs {c['reference_rel_error']:.5f}")
    for r in (r for r in records if r["kind"] == "e2e"):
        tag = f"whole CLI, one {r['shape'][0]}x{r['shape'][1]} fp16 matrix, lplr f={r['fraction']} {r['bits']}-bit"
        if r["status"] != "ok":
            tails = "; ".join(f"{k}: {v['stderr_tail']}" for k, v in r["runs"].items() if not v["ok"])
            add(f"{tag}: >= 3x faster than the reference process", None, 3.0, None, f"PENDING: {tails}")
            continue
        runs = r["runs"]
        add(f"{tag}: >= 3x faster than the reference process (default report)", r["speedup_with_report"], 3.0,
            r["speedup_with_report"] >= 3.0,
            f"CLI {_s(runs['cli_report']['seconds'])} s (without report {_s(runs['cli_no_report']['seconds'])} s, "
            f"{r['speedup_without_report']:.2f}x) vs reference {_s(runs['reference']['seconds'])} s; load "
            f"{r['loadavg_before'][0]} -> {r['loadavg_after'][0]}")
        share = r.get("report_share")
        add(f"{tag}: the default report adds <= 10 %", r["report_overhead"], 0.10, r["report_overhead"] <= 0.10,
            f"wall with - without report over without; the report itself took "
            f"{_s(r['report_seconds'] or 0.0)} s in the process ({100 * (share or 0.0):.1f} %)")
    conv = {r["shards"]: r for r in records if r["kind"] == "convert"}
    for label, r in conv.items():
        if r["status"] != "ok":
            add(f"conversion ({label} shards): peak <= 4x largest fp32 tensor above baseline", None, 4.0, None,
                f"PENDING: {r['reason']}")
        else:
            add(f"conversion ({label} shards): peak <= 4x largest fp32 tensor above baseline", r["x_largest_fp32"],
                4.0, r["x_largest_fp32"] <= 4.0,
                f"{r['above_baseline_bytes'] / 2**20:.0f} MiB above baseline; "
                f"{r['x_largest_block_fp32']:.2f}x the largest block matrix in fp32")
    if len(conv) == 2:
        s, lg = conv.get("small"), conv.get("large")
        if s["status"] == "ok" and lg["status"] == "ok":
            diff = (lg["above_baseline_bytes"] - s["above_baseline_bytes"]) / s["largest_fp32_bytes"]
            add("conversion: same peak for small and large shards", diff, "abs(diff) <= 0.5x largest fp32 tensor",
                abs(diff) <= 0.5, f"large - small = {diff:+.2f}x the largest fp32 tensor "
                                  f"({lg['output_shards']} vs {s['output_shards']} output shards)")
        else:
            add("conversion: same peak for small and large shards", None, "abs(diff) <= 0.5x largest fp32 tensor", None,
                "PENDING: the conversion did not run")
    return out


def _mib(b):
    if b is None:
        return ""
    return f"{b / 2**20:.1f}" if abs(b) < 10 * 2**20 else f"{b / 2**20:.0f}"


def _range(xs):
    return f"{min(xs):.0f}-{max(xs):.0f}" if xs else "(not measured)"


def _s(x):
    return f"{x:.3g}" if x < 10 else f"{x:.1f}"


def _e2e_markdown(records: list[dict]) -> list[str]:
    """The end-to-end section: every whole-process command's best and all times, and the workers' scaling."""
    rows = [r for r in records if r["kind"] in ("e2e", "e2e_workers")]
    if not rows:
        return []
    L = ["", "## End to end (fresh processes, imports included; best of the interleaved repeats)", "",
         "| case | command | status | best s | all s | load before -> after |", "|---|---|---|---|---|---|"]
    for r in rows:
        case = (f"one {r['shape'][0]}x{r['shape'][1]} matrix" if r["kind"] == "e2e" else
                f"checkpoint {r['checkpoint']}, {r['cores']} cores")
        for key, run in r["runs"].items():
            L.append(f"| {case} | {key} | {'ok' if run['ok'] else 'FAILED: ' + run['stderr_tail']} | "
                     f"{_s(run['seconds'])} | {', '.join(map(str, run['all_seconds']))} | "
                     f"{r['loadavg_before'][0]} -> {r['loadavg_after'][0]} |")
    for r in rows:
        if r["kind"] == "e2e_workers" and r["status"] == "ok":
            L += ["", (f"--workers 2 against --workers 1: {r['speedup_2_over_1']:.2f}x (each worker runs cores / "
                       "workers torch threads; on a machine whose cores the GEMMs already fill, little is to be "
                       "gained, and two extra interpreters start)")]
    return L


def markdown(records: list[dict]) -> str:
    env = next(r for r in records if r["kind"] == "env")
    mm = next(r for r in records if r["kind"] == "matmul")
    end = next((r for r in records if r["kind"] == "env_end"), {})
    isolation = next((r["isolation"] for r in records if r.get("isolation")), "fresh process")
    best = machine_rate(records)
    local = [r["local_matmul_gflops"] for r in records if r.get("local_matmul_gflops")]
    isolation = "fresh subprocess per measurement" if isolation == "fresh process" else "subprocess shared by the jobs"
    L = [f"# lplr-convert benchmark ({env['mode']} run, {env['date']})", "",
         (f"- machine: {env['cpu']}" + (f" ({env['isa']} kernels)" if env.get("isa") else "")
          + f", {env['cores']} cores, torch {env['torch']} ({env['threads']} threads), "
         f"device {env['device']}; git {env['git']}"),
         (f"- load average (1/5/15 min) at start: {env['loadavg']}; at end: {end.get('loadavg')} (the benchmark's own "
          f"{env['threads']} threads make about {env['threads']}; more than {env['cores']} means other work competed "
          "for the cores and single timings are noisy)"),
         (f"- fp32 matmul rate ({mm['n']}x{mm['n']} products): {mm['gflops']:.1f} GFLOP/s at the start (best of "
          f"{mm['reps']}); inside the measurement subprocesses {_range(local)} GFLOP/s; the yardstick is the best rate "
          f"seen, **{best:.1f} GFLOP/s**"),
         f"- synthetic weights: {SPECTRUM}",
         (f"- {FLOPS_FORMULA}; efficiency = flops / time / best matmul rate; 'local' = against the matmul rate measured "
         "in the same subprocess right before the call (on a shared machine this shows the share it got); "
         "load-normalised speed-up = (ref s x ref local rate) / (ours s x ours local rate)"),
         (f"- time: one call in a {isolation} after a small warm-up call (best of the reps); peak memory: VmHWM "
         "after the call minus VmRSS before it (kernel peak counter reset through /proc/self/clear_refs), i.e. "
         "memory above the resident fp16 input; x fp32 = that peak over the matrix's fp32 size"),
         ("- the reference (`scripts/reference_lplr.py`) uses the published per-tensor float64 quantizer and an explicit "
         "float32 pinv; comparisons use our `tensor` quantizer and the very same sketch (same seed)"), "",
         "## Targets", "", "| target | value | threshold | result | detail |", "|---|---|---|---|---|"]
    for t in (r for r in records if r["kind"] == "target"):
        v = t["value"]
        val = "" if v is None else (f"{v:.3f}" if "error" in t["target"] or "matmul" in t["target"]
                                    else f"{v:.2f}")
        res = "PENDING" if t["pass"] is None else ("PASS" if t["pass"] else "MISS")
        L.append(f"| {t['target']} | {val} | {t['threshold']} | **{res}** | {t['detail']} |")
    L += ["", "## Ours against the reference (tensor quantizer, same seed)", "",
          ("| method | shape | f | bits | rank | ours s | ref s | speed-up ref/ours | load-normalised speed-up | "
           "ours/ref time | ours err | ref err | err ratio | ours peak MiB | ref peak MiB |"),
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in (r for r in records if r["kind"] == "compare"):
        sn = c.get("speedup_load_normalized")
        L.append(f"| {c['method']} | {c['shape'][0]}x{c['shape'][1]} | {c['fraction']} | {c['bits']} | {c['rank']} | "
                 f"{_s(c['ours_seconds'])} | {_s(c['reference_seconds'])} | {c['speedup']:.2f}x | "
                 f"{'' if sn is None else f'{sn:.2f}x'} | "
                 f"{c['time_ratio_ours_over_reference']:.3f} | {c['ours_rel_error']:.5f} | "
                 f"{c['reference_rel_error']:.5f} | {c['error_ratio']:.4f} | {_mib(c['ours_peak_bytes'])} | "
                 f"{_mib(c['reference_peak_bytes'])} |")
    L += ["", "## Every per-matrix measurement", "",
          ("| impl | method | quantizer | shape | f | bits | rank | seconds | rel error | GFLOP/s | efficiency | "
           "local matmul GFLOP/s | local efficiency | peak MiB | peak x fp32 |"),
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in (r for r in records if r["kind"] == "matrix"):
        if r.get("status") != "ok":
            L.append(f"| {r['impl']} | {r['method']} | {r.get('quantizer')} | | {r['fraction']} | {r['bits']} | | "
                     f"FAILED: {r.get('error')} | | | | | | | |")
            continue
        gf = r.get("gflops")
        eff = "" if gf is None else f"{gf / best:.0%}"
        lr, le = r.get("local_matmul_gflops"), r.get("local_efficiency")
        local = f"{'' if lr is None else f'{lr:.1f}'} | {'' if le is None else f'{le:.0%}'}"
        L.append(f"| {r['impl']} | {r['method']} | {r['quantizer'] if r['method'] != 'laser' else '-'} | "
                 f"{r['shape'][0]}x{r['shape'][1]} | {r['fraction']} | {r['bits'] if r['method'] != 'laser' else '-'} | "
                 f"{r['rank']} | {_s(r['seconds'])} | {r['rel_error']:.5f} | {'' if gf is None else f'{gf:.1f}'} | "
                 f"{eff} | {local} | {_mib(r['peak_bytes'])} | "
                 f"{r['peak_x_fp32']:.2f} |")
    conv = [r for r in records if r["kind"] == "convert"]
    if conv:
        c0 = conv[0]
        L += ["", "## Whole-conversion peak memory", "",
              (f"Synthetic LLaMA checkpoint {c0['checkpoint']} in {c0['input_shards']} fp16 input shards "
              f"({c0['input_bytes'] / 2**20:.0f} MiB); largest tensor {c0['largest_fp32_bytes'] / 2**20:.0f} MiB in fp32 "
              f"(largest block matrix {c0['largest_block_fp32_bytes'] / 2**20:.0f} MiB); baseline "
              f"{c0['baseline_rss_bytes'] / 2**20:.0f} MiB = {c0['baseline']}."), "",
              ("| shards | --max-shard-size | status | seconds | peak RSS MiB | above baseline MiB | x largest fp32 | "
               "x largest block fp32 | output shards | sampled peak anon / file MiB (baseline) |"),
              "|---|---|---|---|---|---|---|---|---|---|"]
        for r in conv:
            split = ""
            if r.get("sampled_peak_anon_bytes") is not None:
                split = (f"{_mib(r['sampled_peak_anon_bytes'])} / {_mib(r['sampled_peak_file_bytes'])} "
                         f"({_mib(r['baseline_anon_bytes'])} / {_mib(r['baseline_file_bytes'])})")
            if r["status"] != "ok":
                L.append(f"| {r['shards']} | {r['max_shard_size']} | PENDING: {r['reason']} | | | | | | | |")
            else:
                L.append(f"| {r['shards']} | {r['max_shard_size']} | ok | {r['seconds']:.1f} | "
                         f"{_mib(r['peak_rss_bytes'])} | {_mib(r['above_baseline_bytes'])} | "
                         f"{r['x_largest_fp32']:.2f} | {r['x_largest_block_fp32']:.2f} | {r['output_shards']} | "
                         f"{split} |")
        L += ["", ("Peak RSS is wait4's ru_maxrss of the process (kernel-exact); the anon/file split is sampled every "
                  "20 ms from /proc/PID/status (RssAnon: heap and tensors; RssFile: mapped file pages such as "
                  "mmapped safetensors shards and shared libraries).")]
    L += _e2e_markdown(records)
    for p in (r for r in records if r["kind"] == "profile"):
        L += ["", (f"## Profile: {p['impl']} {p['method']} ({p['quantizer']}) {p['shape'][0]}x{p['shape'][1]} "
                  f"f={p['fraction']} {p['bits']}-bit (torch.profiler, self time)"), ""]
        if p.get("status") != "ok":
            L.append(f"FAILED: {p.get('error')}")
            continue
        L += [f"Wall time under the profiler: {p['wall_seconds']:.2f} s.", "",
              "| op | input shapes | calls | self s | share |", "|---|---|---|---|---|"]
        for op in p["top_ops"]:
            L.append(f"| {op['op']} | `{op['shapes']}` | {op['calls']} | {op['self_seconds']:.2f} | "
                     f"{op['share']:.0%} |")
        L += ["", "By operator (all shapes): " + ", ".join(
            f"{op['op']} {op['self_seconds']:.2f} s ({op['share']:.0%})" for op in p["by_op"][:8]) + "."]
    return "\n".join(L) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Driver


def environment(mode_name: str, device: str) -> dict:
    import torch
    from machine import machine_facts

    facts = machine_facts(ROOT)
    return {"kind": "env", "mode": mode_name, "date": dt.datetime.now().isoformat(timespec="seconds"),
            "device": device, "cpu": facts["cpu"], "isa": torch.backends.cpu.get_cpu_capability(),
            "cores": facts["cores"], "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": facts["python"], "git": facts["git"],
            "loadavg": facts["loadavg"], "spectrum": SPECTRUM, "flops_formula": FLOPS_FORMULA}


def _bench_matrices(mode: Mode, args, device: str, work: Path, weights: dict, emit, records: list[dict]) -> None:
    """Items 1-3 of the module doc: every per-matrix measurement, the comparisons and the profiles."""
    from safetensors.torch import save_file

    for m, n in mode.shapes:
        log(f"synthetic {m}x{n} weight")
        weights[(m, n)] = synthetic_weight(m, n)
        save_file({"weight": weights[(m, n)]}, str(work / f"w{m}x{n}.safetensors"))
    for m, n in mode.shapes:
        wfile = str(work / f"w{m}x{n}.safetensors")
        for f in mode.fractions:
            base = {"weight": wfile, "fraction": f, "seed": SEED, "device": device, "reps": args.reps,
                    "matmul_n": mode.matmul_n}
            jobs = [{**base, "impl": "ours", "method": "laser", "quantizer": None, "bits": None}]
            for b in mode.bits:
                jobs += [{**base, "impl": "ours", "method": meth, "quantizer": q, "bits": b} for meth, q in OURS]
                jobs += [{**base, "impl": "reference", "method": meth, "quantizer": "tensor", "bits": b,
                          "device": "cpu"} for meth in REFERENCE]
            if not mode.fresh:
                log(f"{len(jobs)} jobs on {m}x{n} f={f} in one subprocess")
                for rec in run_workers(jobs):
                    emit(rec)
                continue
            for job in jobs:
                log(f"{job['impl']} {job['method']} {job['quantizer']} {m}x{n} f={f} b={job['bits']}")
                emit(run_workers([job])[0])
    for c in comparisons(records):
        emit(c)
    if mode.profile:
        m, n = max(mode.shapes, key=lambda s: s[0] * s[1])
        base = {"weight": str(work / f"w{m}x{n}.safetensors"), "fraction": 0.8, "seed": SEED, "bits": 8,
                "quantizer": "tensor", "reps": 1, "profile": True}
        for impl, meth in (("ours", "lplr"), ("reference", "lplr"), ("ours", "lsvd"), ("reference", "lsvd")):
            log(f"profile {impl} {meth} {m}x{n}")
            emit(run_workers([{**base, "impl": impl, "method": meth,
                               "device": device if impl == "ours" else "cpu"}])[0])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, few configs: under a minute on 2 cores")
    ap.add_argument("--tiny", action="store_true", help="toy shapes: a few seconds (the smoke test's mode)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    ap.add_argument("--reps", type=int, default=1, help="timed calls per measurement (best is reported)")
    ap.add_argument("--no-convert", action="store_true", help="skip the whole-conversion memory measurement")
    ap.add_argument("--no-e2e", action="store_true", help="skip the end-to-end (whole-process) measurements")
    ap.add_argument("--e2e-only", action="store_true",
                    help="only the end-to-end measurements (and the matmul yardstick)")
    ap.add_argument("--write", type=Path, default=None,
                    help="directory for results.jsonl and results.md (default: artifacts/bench for a full run, "
                         "nothing for --quick/--tiny)")
    ap.add_argument("--shapes", help="override the mode's shapes, e.g. 11008x4096,4096x4096")
    ap.add_argument("--fractions", help="override the mode's rank fractions, e.g. 0.8")
    ap.add_argument("--bits", help="override the mode's factor bits, e.g. 8,4")
    ap.add_argument("--no-profile", action="store_true", help="skip the profiler runs of a full run")
    ap.add_argument("--render", type=Path, default=None,
                    help="re-render results.md next to an existing results.jsonl and exit")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.render:  # recompute the derived records (comparisons, targets) from the measurements, then the table
        records = [json.loads(ln) for ln in args.render.read_text().splitlines() if ln.strip()]
        records = [r for r in records if r["kind"] not in ("compare", "target")]
        records += comparisons(records)
        mm = next(r for r in records if r["kind"] == "matmul")
        records += targets(records, machine_rate(records))
        order = {"env": 0, "matmul": 1, "matrix": 2, "compare": 3, "profile": 4, "convert": 5, "e2e": 6,
                 "e2e_workers": 6, "target": 7, "env_end": 8}
        records.sort(key=lambda r: order.get(r["kind"], 8))
        args.render.write_text("".join(json.dumps(r) + "\n" for r in records))
        args.render.with_name("results.md").write_text(markdown(records))
        return 0
    if args.worker:
        for job in json.loads(args.worker):
            print(json.dumps(worker(job)), flush=True)
        return 0

    mode_name = "tiny" if args.tiny else "quick" if args.quick else "full"
    mode = MODES[mode_name]
    if args.shapes:
        mode = replace(mode, shapes=tuple(tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")))
    if args.fractions:
        mode = replace(mode, fractions=tuple(float(x) for x in args.fractions.split(",")))
    if args.bits:
        mode = replace(mode, bits=tuple(int(x) for x in args.bits.split(",")))
    if args.no_profile:
        mode = replace(mode, profile=False)
    out_dir = args.write or (DEFAULT_OUT if mode_name == "full" else None)
    device = pick_device(args.device)
    records: list[dict] = []

    def emit(rec: dict) -> None:
        records.append(rec)
        print(json.dumps(rec), flush=True)

    emit(environment(mode_name, device))
    log(f"{mode_name} run on {device}; matmul rate ...")
    mm = matmul_rate(mode.matmul_n, mode.matmul_reps, device)
    emit(mm)
    with tempfile.TemporaryDirectory(prefix="lplr-bench-") as tmp:
        work = Path(tmp)
        weights: dict = {}
        if not args.e2e_only:
            _bench_matrices(mode, args, device, work, weights, emit, records)
        if not args.no_convert and not args.e2e_only:
            log("whole-conversion peak memory")
            for rec in bench_conversion(mode, weights, work, device):
                emit(rec)
        if not args.no_e2e:
            for rec in bench_end_to_end(mode, weights, work, device):
                emit(rec)
    for t in targets(records, machine_rate(records)):
        emit(t)
    emit({"kind": "env_end", "date": dt.datetime.now().isoformat(timespec="seconds"),
          "loadavg": [round(x, 2) for x in os.getloadavg()]})
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (out_dir / "results.md").write_text(markdown(records))
        log(f"wrote {out_dir / 'results.jsonl'} and {out_dir / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
