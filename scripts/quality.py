#!/usr/bin/env python
"""Quality benchmark: method x budget -> stored bits/param and embedding cosine on all-MiniLM-L6-v2.

The bundled checkpoint is calibrated once on the calibration text shipped in the package, then converted with each
configuration below, and the converted model's sentence embeddings are compared with the original's on a different
text (scripts/data/heldout_sentences.txt, 420 held-out sentences by default). Bits/param counts every stored byte
of the compressed tensors (codes, scales, zero points, factors), read from the manifest. Baselines (rtn, gptq) run
in the same process, on the same statistics and text. llm-compressor's GPTQ is not a dependency; it is not run here
(scripts/llmcompressor_baseline.py runs it, from a separate venv, on the same text and evaluation).

    .venv/bin/python scripts/quality.py                      # full table (~15 min on 2 cores)
    .venv/bin/python scripts/quality.py --quick              # four rows (~2 min)
    .venv/bin/python scripts/quality.py --write artifacts/quality

Decoder LLMs (`--model PATH`, any causal-LM checkpoint directory; SmolLM2-135M is the documented default,
`--model /work/cache/smollm2-135m`): perplexity and mean per-token KL(float || converted) of the float and converted
models on held-out English prose (scripts/data/heldout_prose.txt: the Library of Congress "Workshop on Electronic
Texts" proceedings, 1992, public domain, built by scripts/build_heldout_prose.py; none of the calibration text), one
paragraph per context, the first paragraphs up to `--eval-tokens` tokens; bits/param from the stored bytes of the
compressed tensors; conversion seconds (with the load average, the machine may be shared); the parameter-weighted
relative weight error and, from the calibration statistics, output error of every row (computed here for uncalibrated
methods too, so rows compare). Rows: for each budget (`--budgets`, default 2.25,3.25,4.25) rtn and gptq, symmetric
and asymmetric+MSE, groups 32/64/128 (`--target-bits-per-param B` picks the widest width that fits), qlr and
calibrated lsvd; then the published lplr setting (`--b1 8 --b2 8 --rank-fraction 0.8`) and calibrated lsvd at it.
`--rows` keeps the rows whose label contains one of its comma-separated words; `--stats` reuses a `calibrate` output;
`--incoherence` adds each gptq/qlr row's twin with `--incoherence hadamard`.
HQQ and llm-compressor's GPTQ on the same text, evaluation and statistics, from their own venvs: scripts/decoder_peers.py.

    .venv/bin/python scripts/quality.py --model /work/cache/smollm2-135m --stats /tmp/smol-stats \
        --budgets 4.25 --rows "rtn sym g128,qlr" --eval-tokens 2048 --write artifacts/quality/decoder
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
ROOT = Path(__file__).resolve().parent
DEFAULT_TEXT = ROOT / "data" / "heldout_sentences.txt"
BUDGETS = (2.25, 3.25, 4.25, 8.25)

# (label, calibrated, flat settings): each budget row converts with --target-bits-per-param B.
PER_BUDGET = [
    ("rtn g128 (baseline)", False, {"method": "rtn", "quantizer": "group", "group_size": 128}),
    ("gptq W-sym g128 (baseline)", True, {"method": "gptq", "scheme": "symmetric", "clip": None}),
    ("gptq asym+mse g128 (baseline)", True, {"method": "gptq", "scheme": "asymmetric", "clip": "mse"}),
    ("qlr", True, {"method": "qlr"}),
    ("lsvd calibrated, 4/4", True, {"method": "lsvd", "b1": 4, "b2": 4}),
    ("lplr, 4/4 (no calibration)", False, {"method": "lplr", "b1": 4, "b2": 4}),
]
FIXED = [
    ("lplr rf 0.8, 8/8, published grid", False, {"method": "lplr", "scheme": "minmax", "sketch_precision": "float32"}),
    ("lsvd rf 0.8, 8/8, published grid", False, {"method": "lsvd", "scheme": "minmax"}),
    ("lsvd rf 0.8, 8/8, calibrated", True, {"method": "lsvd"}),
    ("rtn 8-bit per channel", False, {"method": "rtn", "b0": 8}),
    ("rtn 4-bit per channel, published grid", False, {"method": "rtn", "b0": 4, "scheme": "minmax"}),
]
QUICK = [("qlr", 4.25), ("gptq W-sym g128 (baseline)", 4.25), ("qlr", 2.25), ("lsvd rf 0.8, 8/8, calibrated", None)]


def _configs(quick: bool) -> list[tuple[str, bool, dict, float | None]]:
    rows = [(label, cal, layer, b) for b in BUDGETS for label, cal, layer in PER_BUDGET]
    rows += [(label, cal, layer, None) for label, cal, layer in FIXED]
    if quick:
        rows = [r for r in rows if (r[0], r[3]) in QUICK]
    return rows


def _run(src: str, stats: str, text: Path, label: str, calibrated: bool, layer: dict, budget: float | None) -> dict:
    from lplr_convert.evaluate import evaluate_state_dict
    from lplr_convert.io.output import ConvertedOutput
    from lplr_convert.methods import flat_defaults
    from lplr_convert.methods.base import overlay
    from lplr_convert.pipeline.convert import ConvertOptions, convert

    flat = overlay(flat_defaults(), layer)
    out = Path(tempfile.mkdtemp(prefix="lplr_quality_")) / "out"
    t0 = time.perf_counter()
    manifest = convert(ConvertOptions(in_path=src, out_path=str(out), layer=flat, calibration=stats if calibrated else None, device="cpu",
                                      target_bits_per_param=budget, write_report=False))
    seconds = time.perf_counter() - t0
    with ConvertedOutput(out) as o:
        ev = evaluate_state_dict(src, o.iter_dense(), str(text), "cpu", 10_000)
    s = manifest["summary"]
    return {"label": label, "budget": budget, "calibrated": calibrated, "settings": layer,
            "bits_per_param": s["compressed_bits_per_param"], "cosine_mean": ev["cosine_mean"],
            "cosine_min": ev["cosine_min"], "neighbour_kept": ev["neighbour_kept"],
            "weighted_rel_error": s["weighted_rel_error"], "output_rel_error": s.get("output_rel_error"),
            "convert_seconds": round(seconds, 1), "texts": ev["texts"]}


def _markdown(records: list[dict], meta: dict) -> str:
    lines = ["# Quality per bit: all-MiniLM-L6-v2", "",
             (f"Measured {meta['date']} on {meta['machine']}. Calibration: {meta['calibration']}. Evaluation: mean "
             f"cosine of normalised sentence embeddings, converted vs original, over {meta['texts']} held-out "
             f"sentences ({meta['text']}); \"nn kept\" = share whose nearest neighbour is unchanged. Bits/param = "
             "every stored byte of the compressed tensors (codes, scales, zero points, factors) over their "
             "parameters. Budget rows use `--target-bits-per-param B`."), "",
             "| budget | method | bits/param | cosine | min cosine | nn kept | output error | convert s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        out_err = "—" if r["output_rel_error"] is None else f"{r['output_rel_error']:.4f}"
        budget = "—" if r["budget"] is None else f"≤ {r['budget']:g}"
        lines.append(f"| {budget} | {r['label']} | {r['bits_per_param']:.3f} | {r['cosine_mean']:.4f} | "
                     f"{r['cosine_min']:.4f} | {r['neighbour_kept']:.3f} | {out_err} | {r['convert_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="four rows only")
    ap.add_argument("--text", type=Path, default=None, help="evaluation text, one sentence (paragraph) per line")
    ap.add_argument("--samples", type=int, default=None,
                    help="calibration samples (default: 560 lines of the shipped text; 16 for --model)")
    ap.add_argument("--write", type=Path, default=None, help="write results.jsonl and results.md here")
    ap.add_argument("--model", default=None, help="a causal-LM checkpoint directory: the decoder-LLM benchmark")
    ap.add_argument("--stats", default=None, help="--model: calibration statistics to reuse (a `calibrate` output)")
    ap.add_argument("--seq-len", type=int, default=256, help="--model: calibration tokens per sample")
    ap.add_argument("--eval-tokens", type=int, default=4096, help="--model: held-out tokens evaluated (about)")
    ap.add_argument("--budgets", default="2.25,3.25,4.25", help="--model: bits/param budgets, comma separated")
    ap.add_argument("--rows", default=None,
                    help="--model: keep rows whose label contains one of these words (comma separated; "
                         "'=LABEL' keeps that label only)")
    ap.add_argument("--incoherence", action="store_true",
                    help="--model: each gptq/qlr row also with --incoherence hadamard (label '+hadamard')")
    ap.add_argument("--layers", default=None,
                    help="--model: compress only these blocks (e.g. '5,15,25'; the rest stay float): a cheaper "
                         "controlled comparison of settings, recorded in the row")
    ap.add_argument("--b0", type=int, default=None,
                    help="--model: convert rtn/gptq rows at this width instead of --target-bits-per-param (the same "
                         "bytes where the budget gives every tensor that width, without the allocation pass, which "
                         "runs GPTQ once more per tensor); the row records it and must stay within its budget")
    args = ap.parse_args(argv)
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level=os.environ.get("LOGURU_LEVEL", "WARNING"))
    if args.model is not None:
        return llm_main(args)
    args.text = args.text or DEFAULT_TEXT
    args.samples = args.samples or 560
    from lplr_convert.calibration import calibrate
    from lplr_convert.io.reader import resolve_source

    src = str(resolve_source("bundled:all-MiniLM-L6-v2")[0])
    stats = str(Path(tempfile.mkdtemp(prefix="lplr_quality_stats_")) / "stats")
    cal = calibrate(src, stats, samples=args.samples, seq_len=128, batch_size=16)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "calibration": f"{cal['samples']} samples, {cal['tokens']} tokens of the shipped calibration text",
            "text": args.text.name, "texts": None}
    records = []
    for label, calibrated, layer, budget in _configs(args.quick):
        rec = _run(src, stats, args.text, label, calibrated, layer, budget)
        meta["texts"] = rec["texts"]
        records.append(rec)
        print(json.dumps(rec), flush=True)
    if args.write is not None:
        args.write.mkdir(parents=True, exist_ok=True)
        (args.write / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [{"meta": meta}, *records]))
        (args.write / "results.md").write_text(_markdown(records, meta))
    return 0


# ------------------------------------------------------------------------------------------------ decoder LLMs

PROSE = ROOT / "data" / "heldout_prose.txt"
GROUPS = (128, 64, 32)


def llm_configs(budgets: list[float], incoherence: bool = False) -> list[tuple[str, bool, dict, float | None]]:
    """(label, calibrated, flat settings, budget) of the decoder table; with `incoherence`, each gptq and qlr row is
    followed by its twin with `--incoherence hadamard` (label "... +hadamard")."""
    rows = []

    def add(label, calibrated, layer, b):
        rows.append((label, calibrated, layer, b))
        if incoherence and layer["method"] in ("gptq", "qlr"):
            rows.append((f"{label} +hadamard", calibrated, {**layer, "incoherence": "hadamard"}, b))

    for b in budgets:
        for g in GROUPS:
            for scheme, extra in (("sym", {"scheme": "symmetric", "clip": None}),
                                  ("asym+mse", {"scheme": "asymmetric", "clip": "mse"})):
                add(f"rtn {scheme} g{g}", False, {"method": "rtn", "quantizer": "group", "group_size": g, **extra}, b)
                add(f"gptq {scheme} g{g}", True, {"method": "gptq", "group_size": g, **extra}, b)
        add("qlr", True, {"method": "qlr"}, b)
        add("qlr iters 1", True, {"method": "qlr", "iters": 1}, b)  # one alternation: about half the time
        rows.append(("lsvd calibrated 4/4", True, {"method": "lsvd", "b1": 4, "b2": 4}, b))
    published = {"b1": 8, "b2": 8, "rank_fraction": 0.8}
    rows.append(("lplr published (8/8, rf 0.8)", False, {"method": "lplr", **published}, None))
    rows.append(("lsvd calibrated (8/8, rf 0.8)", True, {"method": "lsvd", **published}, None))
    return rows


def prose_texts(model: str, path: Path, tokens: int) -> tuple[list[str], int]:
    """The first paragraphs of `path` holding about `tokens` tokens (the model's tokenizer), and their count."""
    from lplr_convert.calibration.text import load_tokenizer

    tok = load_tokenizer(Path(model))
    out, total = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and total < tokens:
            out.append(line.strip())
            total += len(tok(line.strip())["input_ids"])
    return out, total


def output_error(out: Path, src: str, stats_dir: str) -> tuple[float | None, float | None, dict]:
    """(parameter-weighted relative weight error, parameter-weighted relative output error sqrt(tr(D H D^T) /
    tr(W H W^T)) against the calibration statistics, per-tensor output errors) of a conversion's compressed
    tensors, measured on what a loader returns (for every method, calibrated or not)."""
    from lplr_convert.io.output import ConvertedOutput
    from lplr_convert.io.reader import open_source

    source = open_source(src)
    with ConvertedOutput(out) as o:
        recs = {r.name: r for r in o.records if r.method != "copy"}
        originals = dict(source.iter_tensors(list(recs)))

        def items():
            for name, dense in o.iter_dense():
                rec = recs.get(name)
                if rec is not None:
                    W, W_hat = originals[name].float(), dense.float()
                    yield (name, W.T, W_hat.T, float(rec.rel_error)) if rec.transposed else \
                        (name, W, W_hat, float(rec.rel_error))

        return tensor_errors(items(), stats_dir)


def tensor_errors(items, stats_dir: str) -> tuple[float, float | None, dict]:
    """As `output_error`, from (name, W, W_hat, relative weight error or None to compute it) of each compressed
    tensor, W and W_hat (out x in) in the orientation of the statistics. Used by scripts/decoder_peers.py too."""
    from lplr_convert.calibration import load_calibration
    from lplr_convert.math.weighted import weighted_relative_error

    stats = load_calibration(stats_dir)
    per, num_w, num_o, params = {}, 0.0, 0.0, 0
    for name, W, W_hat, rel in items:
        n = W.numel()
        num_w += n * (float((W - W_hat).norm() / W.norm()) if rel is None else rel)
        if name in stats:
            per[name] = float(weighted_relative_error(W, W_hat, stats.statistic(name).float()))
            num_o += n * per[name]
        params += n
    return num_w / params, (num_o / params if per else None), per


def _commit() -> str | None:
    """The checkout's commit (rows from different code must not be read as one run), or None outside git."""
    import subprocess

    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=False, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def llm_main(args) -> int:
    import torch

    from lplr_convert.calibration import calibrate
    from lplr_convert.errors import LplrError
    from lplr_convert.evaluate import evaluate_state_dict
    from lplr_convert.io.output import ConvertedOutput
    from lplr_convert.methods import flat_defaults
    from lplr_convert.methods.base import overlay
    from lplr_convert.pipeline.convert import ConvertOptions, convert

    src = args.model
    stats = args.stats
    if stats is None:
        stats = str(Path(tempfile.mkdtemp(prefix="lplr_quality_stats_")) / "stats")
        calibrate(src, stats, samples=args.samples or 16, seq_len=args.seq_len, device="cpu")
    from lplr_convert.calibration import load_calibration

    m = load_calibration(stats).manifest
    texts, tokens = prose_texts(src, args.text or PROSE, args.eval_tokens)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "model": src, "calibration": f"{m.get('samples')} samples, {m.get('tokens')} tokens ({m.get('text')})",
            "text": (args.text or PROSE).name, "paragraphs": len(texts), "tokens": tokens,
            "threads": torch.get_num_threads(), "commit": _commit(), "sequential": m.get("sequential")}
    words = [w.strip() for w in args.rows.split(",")] if args.rows else None
    configs = [c for c in llm_configs([float(b) for b in args.budgets.split(",") if b], args.incoherence)
               if words is None or any(c[0] == w[1:] if w.startswith("=") else w in c[0] for w in words)]
    records = []
    for label, calibrated, layer, budget in configs:
        fixed = args.b0 is not None and layer["method"] in ("rtn", "gptq")
        if fixed:
            layer = {**layer, "b0": args.b0}
        flat = overlay(flat_defaults(), layer)
        out = Path(tempfile.mkdtemp(prefix="lplr_quality_")) / "out"
        load0 = os.getloadavg()[0]
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            manifest = convert(ConvertOptions(in_path=src, out_path=str(out), layer=flat,
                                              calibration=stats if calibrated else None, device="cpu",
                                              target_bits_per_param=None if fixed else budget, layers=args.layers,
                                              write_report=False))
        except LplrError as e:  # e.g. a budget no width of this grid fits: said in the table
            rec = {"label": label, "budget": budget, "settings": layer, "error": str(e).splitlines()[0]}
            records.append(rec)
            print(json.dumps(rec), flush=True)
            write_llm_rows(args.write, meta, [rec])
            continue
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        with ConvertedOutput(out) as o:
            ev = evaluate_state_dict(src, o.iter_dense(), texts, "cpu", 10**9)
        werr, oerr, _ = output_error(out, src, stats)
        s = manifest["summary"]
        rec = {"label": label, "budget": budget, "calibrated": calibrated, "settings": layer,
               "bits_per_param": s["compressed_bits_per_param"], "perplexity_float": ev["perplexity_original"],
               "perplexity": ev["perplexity_converted"],
               "ppl_ratio": ev["perplexity_converted"] / ev["perplexity_original"], "kl_mean": ev["kl_mean"],
               "top1_agreement": ev["top1_agreement"], "weighted_rel_error": werr, "output_rel_error": oerr,
               "convert_seconds": round(seconds, 1), "convert_cpu_seconds": round(cpu, 1),
               "load": [round(load0, 1), round(os.getloadavg()[0], 1)],
               "tokens": ev["tokens"]}
        objective = (manifest.get("options", {}).get("allocation") or {}).get("objective")
        if objective == "sensitivity":
            rec["budget_objective"] = objective  # the budget weighed the tensors by their output sensitivity
        if args.layers is not None:
            rec["layers"] = args.layers  # only these blocks compressed; bits/param over them
        if fixed:
            rec["fixed_b0"] = args.b0  # converted at --b0, not through the budget's allocation pass
            if budget is not None and rec["bits_per_param"] > budget:
                rec["error"] = f"--b0 {args.b0} stores {rec['bits_per_param']:.3f} bits/param, over the budget"
        records.append(rec)
        print(json.dumps(rec), flush=True)
        write_llm_rows(args.write, meta, [rec])
        shutil.rmtree(out.parent, ignore_errors=True)
    return 0


def write_llm_rows(where: Path | None, meta: dict, records: list[dict]) -> None:
    """Append `records` (after their run's `meta`) to where/results.jsonl as each row finishes (runs of a few rows add
    up to a table; an interrupted run keeps its finished rows) and re-render where/results.md."""
    if where is None:
        return
    where.mkdir(parents=True, exist_ok=True)
    with open(where / "results.jsonl", "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in [{"meta": meta}, *records]))
    (where / "results.md").write_text(llm_markdown(where / "results.jsonl"))


def llm_markdown(jsonl: Path) -> str:
    """The decoder table from every run appended to `jsonl` (each row with its run's date and load)."""
    intro = ("Perplexity (ppl) and mean per-token KL(float || converted) on held-out prose, one paragraph a context; "
             "bits/param = stored bytes of the compressed tensors over their parameters; weight / output error = "
             "parameter-weighted relative errors (output error against the calibration statistics, for every row); "
             "convert s / cpu s = the conversion's wall and CPU seconds (one thread where the run's meta says so); "
             "load = the 1-minute load average before and after the conversion (2 cores, shared).")
    header = ("| run | model | budget | method | bits/param | ppl (float) | ppl ratio | KL | weight err | output err "
              "| convert s | cpu s | load |")
    lines = ["# Quality per bit: decoder LLMs", "", intro, "", header,
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    meta = {}
    for line in jsonl.read_text().splitlines():
        r = json.loads(line)
        if "meta" in r:
            meta = r["meta"]
            continue
        budget = "—" if r["budget"] is None else f"≤ {r['budget']:g}"
        if r.get("source") and r["budget"] is not None:  # a peer at the nearest bits, not held to the budget
            budget = f"beside ≤ {r['budget']:g}"
        seq = meta.get("sequential")
        seq = f", sequential statistics ({seq.get('method')} {seq.get('settings', {}).get('b0', '?')}-bit blocks)" \
            if seq else ""
        label = r["label"] + (f" (--b0 {r['fixed_b0']})" if "fixed_b0" in r else "") + \
            (", sensitivity budget" if r.get("budget_objective") == "sensitivity" else "") + \
            (f", blocks {r['layers']} only" if "layers" in r else "") + seq
        head = f"| {meta.get('date')} | {Path(meta.get('model', '?')).name} | {budget} | {label} |"
        if "error" in r and "perplexity" not in r:
            lines.append(f"{head} — | — | — | — | — | — | — | — | {r['error']} |")
            continue
        oerr = "—" if r["output_rel_error"] is None else f"{r['output_rel_error']:.4f}"
        cpu = "—" if r.get("convert_cpu_seconds") is None else f"{r['convert_cpu_seconds']:.0f}"
        lines.append(f"{head} {r['bits_per_param']:.3f} | {r['perplexity']:.2f} ({r['perplexity_float']:.2f}) | "
                     f"{r['ppl_ratio']:.3f} | {r['kl_mean']:.4f} | {r['weighted_rel_error']:.4f} | {oerr} | "
                     f"{r['convert_seconds']:.0f} | {cpu} | {r['load'][0]}–{r['load'][1]} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
