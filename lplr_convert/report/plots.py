"""PNG plots of a report (matplotlib's object API on the Agg canvas, imported lazily: no pyplot, no global state)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from .. import constants as C
from .metrics import group_rows, type_sort_key

__all__ = ["have_matplotlib", "plot_bits_per_layer", "plot_error_per_layer", "plot_spectrum", "preload"]

_SIZE = (9, 4.8)
_DPI = 120


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _import_backend():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    return Figure, FigureCanvasAgg


def preload() -> None:
    """Import matplotlib in a background thread (about half a second), e.g. while a conversion computes, so that the
    report does not wait for it; does nothing without matplotlib."""

    def run():
        try:
            _import_backend()
        except ImportError:
            pass

    threading.Thread(target=run, name="lplr-preload-matplotlib", daemon=True).start()


class _Canvas:
    """The two pyplot calls the plots make, on matplotlib's object API (0.15 s less import than pyplot, and no
    global figure registry to close)."""

    @staticmethod
    def subplots(figsize):
        Figure, FigureCanvasAgg = _import_backend()
        fig = Figure(figsize=figsize)
        FigureCanvasAgg(fig)
        return fig, fig.subplots()

    @staticmethod
    def close(fig) -> None:
        pass


def _pyplot():
    return _Canvas


def _series(rows: list[dict], value: str) -> dict[str, tuple[list[int], list[float]]]:
    """Per matrix type (and method, when several are mixed): layer indices and values of block tensors."""
    block = [r for r in rows if r["method"] != "copy" and r["layer"] is not None and r.get(value) is not None]
    mixed = len({r["method"] for r in block}) > 1
    groups = group_rows(sorted(block, key=lambda r: (type_sort_key(r["matrix_type"]), r["method"], r["layer"])),
                        lambda r: f"{r['matrix_type']} ({r['method']})" if mixed else str(r["matrix_type"]))
    return {k: ([r["layer"] for r in g], [r[value] for r in g]) for k, g in groups.items()}


def _layer_axes(ax, series: dict, ylabel: str, title: str, n_outside: int) -> None:
    layers = sorted({x for xs, _ in series.values() for x in xs})
    marker = "o" if len(layers) <= 40 else None
    for i, (label, (xs, ys)) in enumerate(series.items()):
        ax.plot(xs, ys, marker=marker, markersize=4, linewidth=1.5, label=label, color=f"C{i % 10}")
    ax.set_xlabel("layer (transformer block index)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if layers and len(layers) <= 40:
        ax.set_xticks(layers)
    ax.grid(True, alpha=0.3)
    if n_outside:
        ax.text(0.0, -0.16, f"{n_outside} compressed tensor(s) outside transformer blocks are not shown",
                transform=ax.transAxes, fontsize=8, color="dimgray")


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    tmp = path.with_name(path.name + C.PARTIAL_SUFFIX)  # never a truncated PNG under the plot's name
    try:
        fig.savefig(tmp, dpi=_DPI, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    plt.close(fig)
    return path


def _figure(rows: list[dict], value: str):
    """(series of `value`, pyplot, figure, axes), or None when no block tensor has that value."""
    series = _series(rows, value)
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=_SIZE)
    return series, plt, fig, ax


_ERROR_AXES = {"rel_error": ("relative error ‖W − Ŵ‖_F / ‖W‖_F", "Relative error per layer"),
               "output_rel_error": ("output error √(tr(ΔHΔᵀ) / tr(WHWᵀ))",
                                    "Output error per layer (calibration inputs)")}


def plot_error_per_layer(rows: list[dict], path: Path, subtitle: str = "", value: str = "rel_error") -> Path | None:
    """Relative error of each compressed block tensor, one line per matrix type: the weight's Frobenius error, or
    (value "output_rel_error") the output error on the calibration inputs."""
    made = _figure(rows, value)
    if made is None:
        return None
    series, plt, fig, ax = made
    outside = sum(r["method"] != "copy" and r["layer"] is None for r in rows)
    ylabel, title = _ERROR_AXES[value]
    _layer_axes(ax, series, ylabel, title + subtitle, outside)
    ax.set_ylim(bottom=0)
    ax.legend(title="matrix type", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path, plt)


def plot_bits_per_layer(rows: list[dict], path: Path, subtitle: str = "") -> Path | None:
    """Stored bits/param of each compressed block tensor as grouped bars, with the source dtype and int8 lines."""
    made = _figure(rows, "bits_per_param")
    if made is None:
        return None
    series, plt, fig, ax = made
    layers = sorted({x for xs, _ in series.values() for x in xs})
    width = 0.84 / len(series)
    for i, (label, (xs, ys)) in enumerate(series.items()):
        offset = (i - (len(series) - 1) / 2) * width
        ax.bar([x + offset for x in xs], ys, width=width, label=label, color=f"C{i % 10}")
    comp = [r for r in rows if r["method"] != "copy"]
    dtypes = {round(r["source_bits_per_param"]): r["dtype"] for r in comp}
    for b in sorted(dtypes):
        ax.axhline(b, color="black", linestyle="--", linewidth=1.2, label=f"source {dtypes[b]} ({b} bits)")
    ax.axhline(8, color="firebrick", linestyle=":", linewidth=1.8, label="int8 (8 bits)")
    grown = sum(r["bits_per_param"] > r["source_bits_per_param"] for r in comp)
    if grown:
        ax.text(0.01, 0.98, f"{grown} tensor(s) stored LARGER than in the source (above the dashed line)",
                transform=ax.transAxes, va="top", fontsize=9, color="firebrick", fontweight="bold")
    top = max([*dtypes, 8, *(y for _, ys in series.values() for y in ys)])
    ax.set_ylim(0, top * (1.16 if grown else 1.08))
    ax.set_xlabel("layer (transformer block index)")
    ax.set_ylabel("stored bits per parameter")
    ax.set_title("Bits/param per layer" + subtitle)
    if len(layers) <= 40:
        ax.set_xticks(layers)
    ax.grid(True, axis="y", alpha=0.3)
    outside = sum(r["method"] != "copy" and r["layer"] is None for r in rows)
    if outside:
        ax.text(0.0, -0.16, f"{outside} compressed tensor(s) outside transformer blocks are not shown",
                transform=ax.transAxes, fontsize=8, color="dimgray")
    ax.legend(title="matrix type", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path, plt)


def plot_spectrum(spectra: dict[str, dict], rows: list[dict], path: Path, subtitle: str = "") -> Path | None:
    """Normalized cumulative singular-value energy of a few tensors, with each tensor's kept rank marked.

    `spectra` maps names to spectrum records (see `report.spectra`); where a curve is only bracketed (kind "svd",
    beyond `exact_to`) the band between its lower and upper bound is shaded and the legend says so."""
    if not spectra:
        return None
    plt = _pyplot()
    by_name = {r["name"]: r for r in rows}
    fig, ax = plt.subplots(figsize=_SIZE)
    fractions = set()
    for i, (name, sp) in enumerate(spectra.items()):
        curve, color = sp["curve"], f"C{i % 10}"
        n = len(curve)
        xs = [0.0] + [(j + 1) / n for j in range(n)]
        ys = [0.0] + list(curve)
        r = by_name.get(name, {})
        label = _short(name, r) + _kind_text(sp)
        if r.get("rank") and r.get("max_rank"):
            f = r["rank"] / r["max_rank"]
            e = ys[min(n, max(1, round(f * n)))]
            fractions.add(round(f, 3))
            ax.plot([f], [e], marker="o", markersize=7, color=color, markeredgecolor="black", zorder=3)
            label += f": rank {r['rank']} keeps {100 * e:.1f} %"
        ax.plot(xs, ys, linewidth=1.6, color=color, label=label)
        if sp.get("upper"):
            ax.fill_between(xs, ys, [0.0] + list(sp["upper"]), color=color, alpha=0.18, linewidth=0)
    for f in sorted(fractions):
        ax.axvline(f, color="gray", linestyle=":", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("kept rank / min(m, n)")
    ax.set_ylabel("fraction of Σσ² kept")
    ax.set_title("Singular-value energy of representative tensors" + subtitle)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right", title="tensor (dot: rank kept by the conversion)", title_fontsize=8)
    return _save(fig, path, plt)


def _kind_text(sp: dict) -> str:
    if sp.get("kind") == "svd" and sp.get("exact_to", 1.0) < 1.0:
        return f" [method's SVD: exact to {sp['exact_to']:.2f}, band beyond]"
    return f" [{sp.get('kind', 'exact')}]"


def _short(name: str, row: dict) -> str:
    if row.get("layer") is not None and row.get("matrix_type"):
        shape = "×".join(str(d) for d in row.get("shape", []))
        return f"layer {row['layer']} {row['matrix_type']} ({shape})"
    return name if len(name) <= 48 else "…" + name[-47:]
