"""Layer-wise error report of a conversion: JSON / CSV / Markdown tables, PNG plots, terminal summary, comparisons."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from loguru import logger

from .. import constants as C
from ..errors import LplrError, opt
from ..io.manifest import Manifest, file_record, read_manifest, seal_digests, write_json_atomic
from ..io.outdir import owning_output
from .metrics import report_summary, tensor_rows
from .spectra import energy_curve, representative_tensors, source_spectra
from .tables import (
    COMPARISON_HEADING,
    compare_markdown,
    dir_labels,
    report_markdown,
    rows_csv,
    summary_markdown,
    summary_table,
)

__all__ = [
    "compare",
    "energy_curve",
    "render_report",
    "report_summary",
    "summary_markdown",
    "summary_table",
    "tensor_rows",
    "write_report",
]

REPORT_KIND = "lplr-convert report"


def _write_text(path: Path, text: str) -> Path:
    tmp = path.with_name(path.name + C.PARTIAL_SUFFIX)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


# How each kind of curve was obtained, as the report states it.
SPECTRUM_KINDS = {
    "exact": "exact: every singular value (Gram matrix and its eigenvalues in the weight's precision)",
    "svd": "from the method's own SVD: exact up to its rank, then a band (chord = lower bound, sigma_k slope = upper "
           "bound) where only the total energy is known",
    "given": "curve passed by the caller",
}


def _curve_record(curve, kind: str = "exact") -> dict:
    return {"kind": kind, "curve": [float(v) for v in curve], "upper": None, "exact_to": 1.0}


def _previous_spectra(out_dir: Path, names: set[str]) -> dict[str, dict]:
    """Curves stored by an earlier rendering of this directory's report (the source may be gone since)."""
    try:
        old = json.loads((out_dir / C.REPORT_JSON).read_text(encoding="utf-8"))
        curves, info = old.get("spectra") or {}, old.get("spectra_info") or {}
    except (OSError, ValueError, AttributeError, RecursionError):
        return {}
    return {n: {**_curve_record(c), **(info.get(n) or {}), "curve": c} for n, c in curves.items()
            if n in names and isinstance(c, list) and c}


def _resolve_spectra(out_dir: Path, manifest: Manifest, rows: list[dict], spectra: dict | None,
                     read_source: bool) -> dict[str, dict]:
    """name -> spectrum record: the caller's curves, else those the conversion stored in its records, else an earlier
    report's, else (when `read_source`) exact spectra read from the source checkpoint."""
    names = {r["name"] for r in rows}
    if spectra:
        return {n: _curve_record(c, "given") for n, c in spectra.items() if n in names and len(c)}
    stored = {r.name: r.spectrum for r in manifest.tensors if r.spectrum and r.name in names}
    if stored:
        return stored
    prev = _previous_spectra(out_dir, {r["name"] for r in rows if r["method"] != "copy"})
    if prev or not read_source:
        return prev
    try:
        return {n: _curve_record(c) for n, c in source_spectra(manifest, representative_tensors(rows)).items()}
    except Exception as e:  # noqa: BLE001  (a damaged or moved source must not stop the report)
        logger.warning(f"spectrum plot skipped: the source checkpoint could not be read ({type(e).__name__}: {e})")
        return {}


def _spectra_note(manifest: Manifest, rows: list[dict], spectra: dict[str, dict]) -> str:
    """One line saying what the spectrum plot shows, or why there is none."""
    if spectra:
        kinds = sorted({s["kind"] for s in spectra.values()})
        return "Spectra: " + "; ".join(f"{k} = {SPECTRUM_KINDS.get(k, k)}" for k in kinds) + "."
    mode = manifest.options.get("spectra")
    if mode == "off":
        return "Spectra: not computed (--spectra off)."
    methods = sorted({r["method"] for r in rows if r["method"] != "copy"})
    return (f"Spectra: none; {'/'.join(methods) or 'no method'} computes no singular values to reuse. "
            "`--spectra exact` computes them (one Gram eigendecomposition per plotted tensor).")


def _plots(out_dir: Path, manifest: Manifest, rows: list[dict], curves: dict) -> list[Path]:
    from .plots import have_matplotlib, plot_bits_per_layer, plot_error_per_layer, plot_spectrum

    targets = [out_dir / C.PLOT_ERROR, out_dir / C.PLOT_OUTPUT_ERROR, out_dir / C.PLOT_BITS, out_dir / C.PLOT_SPECTRUM]
    if not have_matplotlib():
        logger.warning("matplotlib is not installed: the report has no plots (pip install 'lplr-convert[plots]')")
        return []
    src = manifest.source
    methods = sorted({r["method"] for r in rows if r["method"] != "copy"})
    subtitle = f" — {src.get('model_type') or 'model'}, {'/'.join(methods) or 'copy'}"
    made = [plot_error_per_layer(rows, targets[0], subtitle),
            plot_error_per_layer(rows, targets[1], subtitle, "output_rel_error"),
            plot_bits_per_layer(rows, targets[2], subtitle), plot_spectrum(curves, rows, targets[3], subtitle)]
    for target, path in zip(targets, made):
        if path is None:
            target.unlink(missing_ok=True)  # never leave a plot of an earlier conversion next to this report
    return [p for p in made if p is not None]


def write_report(out_dir: str | os.PathLike, manifest: dict | None = None,
                 spectra: dict[str, list[float]] | None = None, read_source: bool = True,
                 summary: dict | None = None) -> list[Path]:
    """Write lplr_report.json/.csv/.md and the PNG plots into `out_dir`; returns the paths written.

    `manifest` defaults to the directory's complete manifest. `spectra` maps tensor names to normalized cumulative
    energy curves (see `energy_curve`); without it the curves the conversion stored in its records are used, else
    those of an earlier report, else (with `read_source`) up to four representative tensors are read from the source
    checkpoint when it is reachable, else that plot is skipped. The report says which kind each curve is.
    `summary`: the summary of these records when the caller has computed it (`metrics.summary_of`; convert does).
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    manifest = Manifest.coerce(read_manifest(out_dir) if manifest is None else manifest)
    rows = tensor_rows(manifest)
    summary = report_summary(rows) if summary is None else summary
    found = _resolve_spectra(out_dir, manifest, rows, spectra, read_source)
    note = _spectra_note(manifest, rows, found)
    plots = _plots(out_dir, manifest, rows, found)
    src, opts = manifest.source, manifest.options
    doc = {"kind": REPORT_KIND, "tool": manifest.tool, "tool_version": manifest.tool_version,
           "format_version": manifest.format_version,
           "source": {k: src.get(k) for k in ("path", "repo_id", "revision", "model_type", "architectures")},
           "command": opts.get("command"), "settings": opts.get("settings"), "summary": summary,
           "eval": manifest.eval, "plots": [p.name for p in plots],
           "spectra": {n: sp["curve"] for n, sp in found.items()},
           "spectra_info": {n: {k: v for k, v in sp.items() if k != "curve"} for n, sp in found.items()},
           "spectra_note": note, "tensors": rows}
    write_json_atomic(out_dir / C.REPORT_JSON, doc)
    written = [out_dir / C.REPORT_JSON,
               _write_text(out_dir / C.REPORT_CSV, rows_csv(rows)),
               _write_text(out_dir / C.REPORT_MD, report_markdown(manifest, rows, summary, [p.name for p in plots],
                                                                  note))]
    _record_files(out_dir, manifest, written + plots)
    logger.info(f"report written to {out_dir} ({len(plots)} plot(s)) in {time.perf_counter() - t0:.2f} s")
    return written + plots


def _record_files(out_dir: Path, manifest: Manifest, written: list[Path]) -> None:
    """List the report's files (size and sha256) in the manifest on disk, when it is the manifest of these records:
    `verify` then checks them, and `push` uploads no file the manifest does not list."""
    path = out_dir / C.MANIFEST_FILE
    try:
        doc = read_manifest(out_dir)
    except LplrError:
        return
    if doc.get(C.M_INTEGRITY) != manifest.integrity:  # another conversion's manifest (or none of ours)
        return
    doc[C.M_REPORT] = {p.name: file_record(p) for p in sorted(written, key=lambda p: p.name)}
    write_json_atomic(path, seal_digests(doc))


def render_report(out_dir: str | os.PathLike) -> list[Path]:
    """Re-render the report of the finished conversion in `out_dir` from its manifest, holding the directory's lock
    (no conversion or evaluation rewrites it meanwhile); returns the paths written."""
    from ..io.outdir import OutputLock

    out_dir = Path(out_dir)
    read_manifest(out_dir)  # a finished conversion, before the lock creates anything in it
    with OutputLock.updating(out_dir):
        return write_report(out_dir, read_manifest(out_dir))


def compare(dirs: list, out: str | os.PathLike | None = None) -> str:
    """Markdown that puts several conversion outputs side by side; also written to `out` when given."""
    if not dirs:
        raise LplrError(f"compare needs at least one output directory; pass {opt('in_path')} DIR (repeat it to compare)")
    manifests = [read_manifest(d) for d in dirs]
    if out is not None:
        _check_out_outside(Path(out), dirs)
    text = compare_markdown(manifests, dir_labels(dirs))
    if out is not None:
        _write_text(Path(out), text)
    return text


def _check_out_outside(out: Path, dirs: list) -> None:
    """Refuse a comparison file that would replace anything but an earlier comparison (a user's file, a device such as
    /dev/null, a link), or land inside a directory of this tool's (a conversion, export or STATS directory: it would
    replace one of its files or add one its record does not list, which `verify`, the loaders and `push` would then
    reject or publish)."""
    target = out.resolve()
    for d in dirs:
        root = Path(d).resolve()
        if target == root or root in target.parents:
            raise LplrError(f"{opt('out')} {out} lies inside the conversion directory {d}; write the comparison "
                            f"outside it (e.g. {root.parent / 'comparison.md'})")
    if target.is_dir():
        raise LplrError(f"{opt('out')} {out} is a directory; pass a file name such as {out / 'comparison.md'}")
    if not target.parent.is_dir():
        raise LplrError(f"{opt('out')} {out}: the directory {target.parent} does not exist; create it or choose "
                        f"another file name")
    owner = owning_output(target.parent)
    if owner is not None:
        raise LplrError(f"{opt('out')} {out} lies inside {owner}, an output directory of lplr-convert; write the "
                        f"comparison outside it (e.g. {owner.parent / 'comparison.md'})")
    if (out.exists() or out.is_symlink()) and not _earlier_comparison(out):
        raise LplrError(f"{opt('out')} {out} exists and is not an earlier comparison written by lplr-convert, so it "
                        f"is not replaced; choose a new file name")


def _earlier_comparison(path: Path) -> bool:
    """A regular file (not a link) whose first line is the comparison heading."""
    if path.is_symlink() or not path.is_file():
        return False
    try:
        with open(path, "rb") as f:
            return f.readline().rstrip(b"\r\n") == COMPARISON_HEADING.encode()
    except OSError:
        return False
