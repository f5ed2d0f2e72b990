"""Text renderings of a report: CSV, Markdown, the terminal summary table, and side-by-side comparisons."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from .. import constants as C
from ..io.manifest import Manifest
from ..methods import all_knobs, available_methods, get_method
from .metrics import FLAG_ABOVE_INT8, FLAG_GREW, is_causal, ruin_verdict, summary_of, type_sort_key

__all__ = [
    "CSV_COLUMNS",
    "compare_markdown",
    "csv_columns",
    "dir_labels",
    "eval_items",
    "report_markdown",
    "rows_csv",
    "summary_markdown",
    "summary_table",
]

COMPARISON_HEADING = "# lplr-convert comparison"  # first line of every comparison file (`report --out`)

# The fixed columns; each knob of the methods in a report gets a column after "label" (see `csv_columns`).
CSV_COLUMNS = ("name", "layer", "matrix_type", "shape", "dtype", "method", "label", "rank", "max_rank",
               "rank_policy", "params", "source_bits_per_param", "bits_per_param", "int8_bits_per_param",
               "original_mb", "stored_mb", "size_ratio", "rel_error", "output_rel_error", "energy_kept", "seconds",
               "flags")
_DASH = "—"


def _f(x, digits: int = 4, dash: str = _DASH) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return dash
    if isinstance(x, int):
        return str(x)
    return f"{x:.{digits}f}"


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:,.2f} MB"


def _pct(x) -> str:
    return _DASH if x is None else f"{100 * x:.1f} %"


def _shape(shape: list[int]) -> str:
    return "×".join(str(d) for d in shape) or "scalar"


def _settings_text(row: dict) -> str:
    """The row's settings label without the method name (e.g. "rank_fraction=0.8 b1=8 b2=8")."""
    return row["label"].removeprefix(row["method"]).strip() or _DASH


def csv_columns(rows: list[dict]) -> list[str]:
    """CSV_COLUMNS plus one column per knob that the rows' methods declare (in registry order, after "label") and
    one per record field they declare (`Method.record_fields`, before "seconds")."""
    knobs = [k for k in all_knobs() if k != "rank" and any(k in r for r in rows)]
    used = {r["method"] for r in rows}
    fields = list(dict.fromkeys(f for m in available_methods() if m in used for f in get_method(m).record_fields))
    at, at_fields = CSV_COLUMNS.index("label") + 1, CSV_COLUMNS.index("seconds")
    return [*CSV_COLUMNS[:at], *knobs, *CSV_COLUMNS[at:at_fields], *fields, *CSV_COLUMNS[at_fields:]]


def _flag_text(flags: list[str]) -> str:
    words = {FLAG_GREW: "**GREW**", FLAG_ABOVE_INT8: "> int8"}
    return ", ".join(words.get(f, f) for f in flags)


def _md_table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    fmt = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                              for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def rows_csv(rows: list[dict]) -> str:
    """All rows (copied tensors included) as CSV with a fixed column order."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    columns = csv_columns(rows)
    w.writerow(columns)
    for r in rows:
        out = []
        for col in columns:
            v = r.get(col)
            if col == "shape":
                v = "x".join(str(d) for d in v)
            elif col == "flags":
                v = ";".join(v)
            elif isinstance(v, float):
                v = f"{v:.6g}"
            out.append("" if v is None else v)
        w.writerow(out)
    return buf.getvalue()


# Measured fidelity levels (artifacts/quality/decoder/NOTES.md, artifacts/quality/results.md): perplexity ratio to the
# original (SmolLM2-135M: qlr 4.25 1.19x, gptq 4-bit 1.46x, rtn 4-bit g128 1.6x, qlr 3.25 2.6x, gptq 3-bit 8.7x, the
# published lplr 27,500x) and mean embedding cosine (MiniLM: gptq 4-bit 0.983, rtn 3-bit 0.84, lplr 4/4 0.44).
EVAL_LEVELS = {"causal_lm": ((1.5, "close"), (3.0, "degraded"), (math.inf, "RUINED")),
               "encoder": ((-0.95, "close"), (-0.8, "degraded"), (math.inf, "RUINED"))}


def eval_verdict(ev: dict) -> str | None:
    """"close", "degraded" or "RUINED", with the number it is read from; None when `ev` has neither."""
    if ev.get("kind") == "causal_lm" and ev.get("perplexity_original") and ev.get("perplexity_converted"):
        ratio = ev["perplexity_converted"] / ev["perplexity_original"]
        key, what = ratio, f"perplexity {ratio:,.0f}x the original's" if ratio >= 100 else \
            f"perplexity {ratio:.2f}x the original's"
    elif ev.get("kind") == "encoder" and ev.get("cosine_mean") is not None:
        key, what = -ev["cosine_mean"], f"mean cosine {ev['cosine_mean']:.3f}"
    else:
        return None
    level = next(name for bound, name in EVAL_LEVELS[ev["kind"]] if key < bound)
    return f"{level} ({what})"


def eval_items(ev: dict | None) -> list[tuple[str, str]]:
    """(label, value) pairs of a fidelity evaluation result, for any table layout."""
    if not ev:
        return []
    items = [("eval texts", f"{ev.get('texts', _DASH)} ({ev.get('text_source', '?')})")]
    if ev.get("kind") == "encoder":
        items += [("mean cosine (original vs converted)", _f(ev.get("cosine_mean"))),
                  ("min cosine", _f(ev.get("cosine_min"))),
                  ("nearest neighbour unchanged", _pct(ev.get("neighbour_kept")))]
    elif ev.get("kind") == "causal_lm":
        items += [("perplexity original → converted",
                   f"{_f(ev.get('perplexity_original'), 3)} → {_f(ev.get('perplexity_converted'), 3)}"),
                  ("mean per-token KL(original ‖ converted)", _f(ev.get("kl_mean"), 5)),
                  ("top-1 next-token agreement", _pct(ev.get("top1_agreement")))]
    verdict = eval_verdict(ev)
    if verdict is not None:
        items.append(("verdict", verdict))
    return items


def _summary_lines(s: dict) -> list[tuple[str, str]]:
    return [
        ("tensors", f"{s['n_tensors']} ({s['n_compressed']} compressed, {s['n_copied']} copied)"),
        ("parameters", f"{s['params']:,} ({s['compressed_params']:,} compressed)"),
        ("size before → after", (f"{_mb(s['original_bytes'])} → {_mb(s['stored_bytes'])} "
                                f"(ratio {_f(s['size_ratio'], 3)})")),
        ("bits/param, whole model", f"{_f(s['bits_per_param'], 2)} (source {_f(s['source_bits_per_param'], 2)})"),
        ("bits/param, compressed tensors",
         f"{_f(s['compressed_bits_per_param'], 2)} (source {_f(s['compressed_source_bits_per_param'], 2)})"),
        ("parameter-weighted relative error", f"{_f(s['weighted_rel_error'])} (max {_f(s['max_rel_error'])})"),
        *([("parameter-weighted output error (calibration inputs)",
            f"{_f(s['output_rel_error'])} (max {_f(s['max_output_rel_error'])})")]
          if s.get("output_rel_error") is not None else []),
        ("compression time", f"{s['seconds']:.1f} s"),
    ]


def verdict_of(manifest: Manifest, s: dict) -> dict | None:
    """`metrics.ruin_verdict` of a conversion: its kind, calibration, main method and budget from the manifest."""
    opts = manifest.options or {}
    methods = {m: a["params"] for m, a in s["by_method"].items() if m != "copy"}
    alloc = opts.get("allocation") or {}
    return ruin_verdict(s, is_causal(manifest.source), opts.get("calibration") is not None,
                        max(methods, key=methods.get) if methods else None, alloc.get("target_bits_per_param"))


def verdict_text(v: dict) -> str:
    return (f"the compressed tensors' {v['measure']} ({v['value']:.3f}, parameter-weighted) is above "
            f"{v['threshold']:g}, where {v['kind']}s measured here collapsed: expect a RUINED model (check with "
            f"`lplr-convert eval`); for a better one, {v['advice']}")


def _warnings(s: dict, manifest: Manifest | None = None) -> list[str]:
    """Bad numbers a reader must not miss."""
    out = []
    v = None if manifest is None else verdict_of(manifest, s)
    if v is not None:
        out.append(verdict_text(v))
    if s["grown"]:
        out.append(f"{len(s['grown'])} tensor(s) are stored LARGER than in the source: " + _names(s["grown"]))
    for m in s["methods_above_source"]:
        a = s["by_method"][m]
        out.append(f"method {m} stores {a['bits_per_param']:.2f} bits/param, more than the source's "
                   f"{a['source_bits_per_param']:.2f}")
    if s["above_int8"]:
        out.append(f"{len(s['above_int8'])} compressed tensor(s) use more bits/param than a plain 8-bit per-channel "
                   f"RTN of the same matrix would (`--method rtn --b0 8`)")
    if s["nonfinite"]:
        out.append(f"{len(s['nonfinite'])} tensor(s) held NaN/inf or could not be compressed to finite values, and "
                   f"were copied verbatim (each one's reason is in its manifest record): " + _names(s["nonfinite"]))
    return out


def _names(names: list[str], limit: int = 5) -> str:
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(f"`{n}`" for n in names[:limit]) + more


def _method_rows(s: dict, pretty) -> list[list[str]]:
    rows = []
    for m, a in s["by_method"].items():
        flags = []
        if a["grew"]:
            flags.append(f"{a['grew']} grew")
        if a["above_int8"]:
            flags.append(f"{a['above_int8']} above int8")
        rows.append([m, str(a["tensors"]), f"{a['params']:,}", _f(a["bits_per_param"], 2),
                     _f(a["size_ratio"], 3), _f(a["weighted_rel_error"]) if m != "copy" else _DASH,
                     _f(a.get("output_rel_error")) if m != "copy" else _DASH, pretty(flags)])
    return rows


_METHOD_HEADER = ["method", "tensors", "params", "bits/param", "size ratio", "weighted rel. error", "output error",
                  "flags"]


def summary_markdown(manifest: Manifest | dict, summary: dict | None = None) -> str:
    """The summary as Markdown (for the model card): totals, per-method table, warnings, fidelity results.
    `summary`: the manifest's summary when the caller has computed it already (`metrics.summary_of`)."""
    manifest = Manifest.coerce(manifest)
    s = summary_of(manifest) if summary is None else summary
    parts = [_md_table(["", "value"], [list(x) for x in _summary_lines(s)], "lr"),
             _md_table(_METHOD_HEADER, _method_rows(s, ", ".join), "lrrrrrrl")]
    warn = _warnings(s, manifest)
    if warn:
        parts.append("\n".join(f"- ⚠ {w}" for w in warn))
    ev = eval_items(manifest.eval)
    if ev:
        parts.append("Fidelity (model outputs, original vs converted):\n\n" + _md_table(["", "value"],
                                                                                         [list(x) for x in ev], "lr"))
    return "\n\n".join(parts) + "\n"


def summary_table(manifest: Manifest | dict, summary: dict | None = None) -> str:
    """A compact plain-text summary for the terminal: per method, totals, flagged tensors, fidelity results.
    `summary`: the manifest's summary when the caller has computed it already (`metrics.summary_of`)."""
    manifest = Manifest.coerce(manifest)
    s = summary_of(manifest) if summary is None else summary
    rows = _method_rows(s, ", ".join)
    rows.append(["total", str(s["n_tensors"]), f"{s['params']:,}", _f(s["bits_per_param"], 2),
                 _f(s["size_ratio"], 3), _f(s["weighted_rel_error"]), ""])
    lines = [_text_table(_METHOD_HEADER, rows),
             (f"size {_mb(s['original_bytes'])} -> {_mb(s['stored_bytes'])} (ratio {_f(s['size_ratio'], 3)}); "
             f"compressed tensors {_f(s['compressed_bits_per_param'], 2)} bits/param "
             f"(source {_f(s['compressed_source_bits_per_param'], 2)})")]
    lines += [f"WARNING: {w}".replace("`", "") for w in _warnings(s, manifest)]
    lines += [f"{k}: {v}" for k, v in eval_items(manifest.eval)]
    return "\n".join(lines)


def report_markdown(manifest: Manifest | dict, rows: list[dict], summary: dict, plots: list[str],
                    spectra_note: str = "") -> str:
    """The full Markdown report: source and command, summary, warnings, fidelity, plots (with `spectra_note`, what
    the spectrum plot shows), per-type and per-tensor tables."""
    manifest = Manifest.coerce(manifest)
    src, opts = manifest.source, manifest.options
    s = summary
    out = [f"# lplr-convert report: {src.get('repo_id') or src.get('path') or 'unknown source'}", ""]
    out += [f"- model type: `{src.get('model_type')}` ({', '.join(src.get('architectures') or []) or '?'})",
            f"- command: `{opts.get('command') or '(not recorded)'}`",
            f"- methods: {', '.join(f'`{m}`' for m in s['methods']) or 'none (everything copied)'}",
            f"- tool: {manifest.tool} {manifest.tool_version}, format {manifest.format_version}",
            "", "## Summary", "", _md_table(["", "value"], [list(x) for x in _summary_lines(s)], "lr"), "",
            _md_table(_METHOD_HEADER, _method_rows(s, ", ".join), "lrrrrrrl"), ""]
    warn = _warnings(s, manifest)
    out += ["## Warnings", ""] + ([f"- ⚠ {w}" for w in warn] or [("- none: no tensor grew, no method exceeds the "
                                                                  "source's bits/param or int8's.")]) + [""]
    ev = manifest.eval
    if ev:
        out += ["## Fidelity (model outputs, original vs converted)", "",
                _md_table(["", "value"], [list(x) for x in eval_items(ev)], "lr"), ""]
    if s["by_matrix_type"]:
        out += ["## Compressed tensors by matrix type", "",
                _md_table(["matrix type", "tensors", "params", "bits/param", "size ratio", "weighted rel. error",
                           "max rel. error", "output error"],
                          [[t if t != "None" else "other", str(a["tensors"]), f"{a['params']:,}",
                            _f(a["bits_per_param"], 2), _f(a["size_ratio"], 3), _f(a["weighted_rel_error"]),
                            _f(a["max_rel_error"]), _f(a.get("output_rel_error"))]
                           for t, a in s["by_matrix_type"].items()]), ""]
    if s["slowest"]:
        out += ["Slowest tensors: " + ", ".join(f"`{n}` ({t:.2f} s)" for n, t in s["slowest"]), ""]
    if plots or spectra_note:
        out += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""] + ([spectra_note, ""] if spectra_note else [])
    comp = [r for r in rows if r["method"] != "copy"]
    if comp:
        out += ["## Compressed tensors", "",
                _md_table(["layer", "type", "tensor", "shape", "method", "rank", "settings", "bits/param", "stored MB",
                           "size ratio", "rel. error", "output error", "Σσ² kept", "s", "flags"],
                          [[_f(r["layer"]), r["matrix_type"] or _DASH, f"`{r['name']}`", _shape(r["shape"]),
                            r["method"], _f(r["rank"]), _settings_text(r), _f(r["bits_per_param"], 2),
                            _f(r["stored_mb"], 3), _f(r["size_ratio"], 3), _f(r["rel_error"]),
                            _f(r["output_rel_error"]), _f(r["energy_kept"]), _f(r["seconds"], 2),
                            _flag_text(r["flags"])]
                           for r in sorted(comp, key=_row_order)],
                          "rllllrlrrrrrrrl"), ""]
    copied = [r for r in rows if r["method"] == "copy"]
    if copied:
        big = sorted(copied, key=lambda r: -r["original_bytes"])[:5]
        out += ["## Copied tensors", "",
                f"{len(copied)} tensors ({sum(r['params'] for r in copied):,} params, "
                f"{_mb(sum(r['stored_bytes'] for r in copied))}) are stored verbatim (embeddings, norms, biases and "
                f"anything the plan leaves alone); they are listed in `{C.REPORT_CSV}` and `{C.REPORT_JSON}`. "
                "Largest: " + ", ".join(f"`{r['name']}` ({_shape(r['shape'])}, {_mb(r['stored_bytes'])})"
                                        for r in big) + ".", ""]
    return "\n".join(out)


def _row_order(r: dict):
    return (r["layer"] is None, r["layer"] if r["layer"] is not None else 0, type_sort_key(r["matrix_type"]),
            r["name"])


def dir_labels(dirs: list) -> list[str]:
    """Short distinct labels for output directories (their names, or parent/name when names clash)."""
    paths = [Path(d).resolve() for d in dirs]
    labels = [p.name for p in paths]
    if len(set(labels)) < len(labels):
        labels = [f"{p.parent.name}/{p.name}" for p in paths]
    if len(set(labels)) < len(labels):
        labels = [str(p) for p in paths]
    return labels


def compare_markdown(manifests: list, labels: list[str]) -> str:
    """Side by side: totals, fidelity and per-matrix-type error / bits/param of several conversions."""
    manifests = [Manifest.coerce(m) for m in manifests]
    summaries = [summary_of(m) for m in manifests]
    head = ["", *labels]
    total_rows = [
        ["source", *[m.source.get("repo_id") or m.source.get("path") or "?" for m in manifests]],
        ["methods", *[", ".join(s["methods"]) or "copy only" for s in summaries]],
        ["size before → after", *[f"{_mb(s['original_bytes'])} → {_mb(s['stored_bytes'])}" for s in summaries]],
        ["size ratio", *[_f(s["size_ratio"], 3) for s in summaries]],
        ["bits/param, whole model", *[_f(s["bits_per_param"], 2) for s in summaries]],
        ["bits/param, compressed tensors", *[_f(s["compressed_bits_per_param"], 2) for s in summaries]],
        ["parameter-weighted rel. error", *[_f(s["weighted_rel_error"]) for s in summaries]],
        ["parameter-weighted output error", *[_f(s.get("output_rel_error")) for s in summaries]],
        ["tensors that grew", *[str(len(s["grown"])) for s in summaries]],
        ["tensors above int8 bits/param", *[str(len(s["above_int8"])) for s in summaries]],
    ]
    evals = [dict(eval_items(m.eval)) for m in manifests]
    for key in dict.fromkeys(k for e in evals for k in e):
        total_rows.append([key, *[e.get(key, _DASH) for e in evals]])
    types = sorted({t for s in summaries for t in s["by_matrix_type"]}, key=lambda t: type_sort_key(
        None if t == "None" else t))
    type_rows = []
    for t in [*types, "all compressed"]:
        row = [t if t != "None" else "other"]
        for s in summaries:
            a = s["by_matrix_type"].get(t) if t != "all compressed" else (
                {"weighted_rel_error": s["weighted_rel_error"], "bits_per_param": s["compressed_bits_per_param"]}
                if s["n_compressed"] else None)
            row += [_f(a["weighted_rel_error"]), _f(a["bits_per_param"], 2)] if a else [_DASH, _DASH]
        type_rows.append(row)
    type_head = ["matrix type"] + [f"{lab} {what}" for lab in labels for what in ("rel. error", "bits/param")]
    return "\n".join([COMPARISON_HEADING, "", "## Totals", "", _md_table(head, total_rows), "",
                      "## Parameter-weighted relative error and bits/param by matrix type", "",
                      _md_table(type_head, type_rows), ""])
