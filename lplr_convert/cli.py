"""Command line: each command parses its options and calls one library function."""

from __future__ import annotations

import os
import shlex
import sys
from functools import wraps

import click
from loguru import logger

from . import __version__
from .errors import LplrError

RANK_OPTIONS = ("rank_fraction", "rank", "bits_per_param", "energy", "rho", "rate")


class _Opt(click.Option):
    """An option that remembers its help section."""

    def __init__(self, *args, section: str = "Other", **kwargs):
        super().__init__(*args, **kwargs)
        self.section = section


class _Sectioned(click.Command):
    """Help output grouped by section."""

    def format_options(self, ctx, formatter):
        sections: dict[str, list] = {}
        for p in self.get_params(ctx):
            rec = p.get_help_record(ctx)
            if rec:
                sections.setdefault(getattr(p, "section", "Other"), []).append(rec)
        for name, rows in sections.items():
            with formatter.section(name):
                formatter.write_dl(rows)


class _DefaultGroup(click.Group):
    """`lplr-convert --in-path ...` means `lplr-convert convert --in-path ...`."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["convert", *args]
        return super().parse_args(ctx, args)


def _opt(*decls, section="Other", **kw):
    return click.option(*decls, cls=_Opt, section=section, **kw)


def plan_options(f):
    """Method, bits, rank policy and selection options shared by `convert` and `inspect`."""
    opts = [
        _opt("--method", type=click.Choice(["lplr", "lsvd", "dsvd", "laser", "rtn"]), default="lplr", show_default=True,
             section="Method", help="Compression method for the selected weights."),
        _opt("--b1", type=int, default=8, show_default=True, section="Method", help="Bits of the left factor L (1-8, 16, 32)."),
        _opt("--b2", type=int, default=8, show_default=True, section="Method", help="Bits of the right factor R (1-8, 16, 32)."),
        _opt("--b0", type=int, default=8, show_default=True, section="Method", help="Bits of rtn's direct quantization."),
        _opt("--quantizer", type=click.Choice(["tensor", "channel", "group"]), default="channel", show_default=True,
             section="Method", help="Scale granularity: tensor (published min-max), channel, or group."),
        _opt("--group-size", type=int, default=None, section="Method", help="Group size along the input dim (--quantizer group)."),
        _opt("--sketch", type=click.Choice(["gaussian", "sparse"]), default="gaussian", show_default=True,
             section="Method", help="LPLR sketch."),
        _opt("--power-iters", type=int, default=0, show_default=True, section="Method", help="LPLR power iterations."),
        _opt("--svd", type=click.Choice(["auto", "exact", "gram", "randomized"]), default="auto", show_default=True,
             section="Method", help="Truncated SVD route (lsvd, dsvd, laser)."),
        _opt("--rank-fraction", type=float, section="Rank policy (one of)", help="r = ceil(f * min(m, n)) [default 0.8]."),
        _opt("--rank", type=int, section="Rank policy (one of)", help="Fixed rank r."),
        _opt("--bits-per-param", type=float, section="Rank policy (one of)",
             help="Largest r whose stored bits (scales included) fit this budget."),
        _opt("--energy", type=float, section="Rank policy (one of)", help="Fewest components holding this fraction of sum(sigma^2)."),
        _opt("--rho", type=float, section="Rank policy (one of)", help="LASER: kept rank int(rho * min(m, n))."),
        _opt("--rate", type=float, section="Rank policy (one of)", help="LASER legacy: rho = 1 - 0.1 * rate."),
        _opt("--include", default=None, section="Selection", help="Regex: compress the 2-D float tensors it matches."),
        _opt("--exclude", default=None, section="Selection", help="Regex: leave matching tensors alone."),
        _opt("--layers", default=None, section="Selection", help="Block indices, e.g. '0,3,5-7' (-1 = all)."),
        _opt("--types", default=None, section="Selection",
             help="LASER matrix types: fc_in, fc_out, fc_up, mlp, q_proj, k_proj, v_proj, out_proj, attn."),
        _opt("--recipe", type=click.Path(dir_okay=False), default=None, section="Selection",
             help="YAML/JSON rules: pattern/layers/types -> method + settings."),
        _opt("--revision", default=None, section="Input", help="Hub revision when --in-path is a repo id."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _settings(kw):
    from .methods import MethodSettings, RankPolicy

    given = [k for k in RANK_OPTIONS if kw.get(k) is not None]
    if len(given) > 1:
        raise LplrError(f"give one rank policy, not {' and '.join('--' + g.replace('_', '-') for g in given)}")
    policy = RankPolicy(given[0], kw[given[0]]) if given else RankPolicy("rank_fraction", 0.8)
    return MethodSettings(method=kw["method"], b1=kw["b1"], b2=kw["b2"], b0=kw["b0"], quantizer=kw["quantizer"],
                          group_size=kw["group_size"], rank=policy, sketch=kw["sketch"],
                          power_iters=kw["power_iters"], svd=kw["svd"])


def _options(kw, **extra):
    from .convert import ConvertOptions

    return ConvertOptions(in_path=kw["in_path"], out_path=extra.pop("out_path", ""), settings=_settings(kw),
                          include=kw["include"], exclude=kw["exclude"], layers=kw["layers"], types=kw["types"],
                          recipe=kw["recipe"], revision=kw["revision"], **extra)


def _setup_logging(debug: bool) -> None:
    logger.remove()
    level = os.environ.get("LOGURU_LEVEL", "DEBUG" if debug else "INFO")
    logger.add(sys.stderr, level=level, format="<level>{level: <7}</level> {message}", colorize=None)


def _friendly(f):
    """One-line errors and a non-zero exit; tracebacks only with --debug."""

    @wraps(f)
    def run(*args, **kwargs):
        debug = kwargs.get("debug", False)
        _setup_logging(debug)
        try:
            return f(*args, **kwargs)
        except LplrError as e:
            if debug:
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted; finish a conversion later with --resume", err=True)
            sys.exit(130)
        except Exception as e:
            if debug:
                raise
            text = str(e).strip().splitlines()[0] if str(e).strip() else ""
            click.echo(f"error: unexpected {type(e).__name__}: {text[:300]} (re-run with --debug for details)", err=True)
            sys.exit(1)

    return run


debug_option = _opt("--debug", is_flag=True, section="Other", help="Show tracebacks and debug logs.")


@click.group(cls=_DefaultGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="lplr-convert")
def main():
    """Compress Hugging Face checkpoints with low-rank, low-precision factorizations.

    `lplr-convert --in-path SRC --out-path DST ...` runs the `convert` command.
    """


@main.command(cls=_Sectioned)
@_opt("--in-path", required=True, section="Input", help="Checkpoint dir, .safetensors/.bin file, Hub repo id, or bundled:all-MiniLM-L6-v2.")
@_opt("--out-path", required=True, type=click.Path(file_okay=False), section="Output", help="Output directory.")
@plan_options
@_opt("--device", default="cpu", show_default=True, section="Run", help="cpu, cuda, cuda:N or auto.")
@_opt("--seed", type=int, default=0, show_default=True, section="Run", help="Global seed (per-tensor seeds derive from it).")
@_opt("--max-shard-size", default="5GB", show_default=True, section="Output", help="Largest output shard, e.g. 5GB, 500MB.")
@_opt("--overwrite", is_flag=True, section="Output", help="Replace an earlier lplr-convert output in --out-path.")
@_opt("--resume", is_flag=True, section="Output", help="Continue an interrupted conversion with the same settings.")
@_opt("--on-nonfinite", type=click.Choice(["error", "copy"]), default="error", show_default=True, section="Run",
      help="A weight with NaN/Inf: stop with an error, or copy it verbatim.")
@_opt("--no-report", is_flag=True, section="Output", help="Skip the report files and plots.")
@_opt("--push-to", default=None, section="Hub", help="After converting, push to this Hub repo (OWNER/NAME).")
@_opt("--private", is_flag=True, section="Hub", help="Create the Hub repo as private.")
@_opt("--token", default=None, section="Hub", help="Hub token (else HF_TOKEN or the login cache). Never printed.")
@debug_option
@_friendly
def convert(**kw):
    """Convert a checkpoint (the default command)."""
    from .convert import convert as run

    command = "lplr-convert " + " ".join(shlex.quote(a) for a in _redacted(sys.argv[1:]))
    opts = _options(kw, out_path=kw["out_path"], seed=kw["seed"], device=kw["device"],
                    max_shard_size=kw["max_shard_size"], overwrite=kw["overwrite"], resume=kw["resume"],
                    on_nonfinite=kw["on_nonfinite"], command=command, write_report=not kw["no_report"])
    manifest = run(opts)
    _print_summary(manifest, kw["out_path"])
    if kw["push_to"]:
        from .hub import push

        result = push(kw["out_path"], kw["push_to"], private=kw["private"], token=kw["token"])
        click.echo(f"pushed to {result.get('url', kw['push_to'])}")


def _redacted(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            out.append("***")
            skip = False
        elif a == "--token":
            out.append(a)
            skip = True
        elif a.startswith("--token="):
            out.append("--token=***")
        else:
            out.append(a)
    return out


def _print_summary(manifest: dict, out_path: str) -> None:
    try:
        from .report import summary_table

        click.echo(summary_table(manifest))
    except ImportError:
        s = manifest["summary"]
        click.echo(f"{s['n_compressed']} of {s['n_tensors']} tensors compressed; {s['original_bytes'] / 1e6:.1f} MB -> "
                   f"{s['stored_bytes'] / 1e6:.1f} MB; compressed weights {s['compressed_bits_per_param']:.2f} "
                   f"bits/param, weighted rel. error {s['weighted_rel_error']:.4f}")
    click.echo(f"wrote {out_path}")


@main.command(cls=_Sectioned)
@_opt("--in-path", required=True, section="Input", help="Checkpoint to inspect.")
@plan_options
@_opt("--json", "as_json", is_flag=True, section="Output", help="Print JSON instead of a table.")
@debug_option
@_friendly
def inspect(**kw):
    """Show what a checkpoint holds, what each tensor would get, and the predicted output size (computes nothing)."""
    import json

    from .convert import inspect as run

    info = run(kw["in_path"], _options(kw))
    if kw["as_json"]:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"{info['source']} ({info['kind']}, model_type={info['model_type']}, {len(info['tensors'])} tensors)")
    click.echo(f"{'tensor':<60} {'shape':>14} {'dtype':>8} {'method':>7} {'rank':>6} {'MB in':>8} {'MB out':>8}")
    for r in info["tensors"]:
        shape = "x".join(map(str, r["shape"]))
        out = "?" if r["predicted_bytes"] is None else f"{r['predicted_bytes'] / 1e6:8.3f}"
        flag = "  GROWS" if r["grows"] else ""
        click.echo(f"{r['name'][:60]:<60} {shape:>14} {r['dtype']:>8} {r['method']:>7} {r['rank'] or ''!s:>6} "
                   f"{r['original_bytes'] / 1e6:8.3f} {out:>8}{flag}")
    note = "" if info["exact"] else " (energy policy: ranks depend on the data, sizes of those tensors unknown)"
    click.echo(f"{info['n_compressed']} tensors to compress; weights {info['original_bytes'] / 1e6:.1f} MB -> "
               f"predicted output {info['predicted_output_bytes'] / 1e6:.1f} MB{note}")


@main.command(cls=_Sectioned)
@_opt("--in-path", required=True, section="Input", help="An lplr-convert output directory.")
@_opt("--out-path", required=True, type=click.Path(file_okay=False), section="Output", help="Where to write the plain checkpoint.")
@_opt("--max-shard-size", default="5GB", show_default=True, section="Output", help="Largest output shard.")
@_opt("--overwrite", is_flag=True, section="Output", help="Replace an existing checkpoint in --out-path.")
@debug_option
@_friendly
def decompress(**kw):
    """Write a plain Hugging Face checkpoint (original names, shapes, dtypes) from a converted directory."""
    from .loading import decompress as run

    click.echo(f"wrote {run(kw['in_path'], kw['out_path'], kw['max_shard_size'], kw['overwrite'])}")


@main.command(cls=_Sectioned)
@_opt("--in-path", "in_paths", required=True, multiple=True, section="Input",
      help="Output directory; repeat to compare several side by side.")
@_opt("--out", default=None, type=click.Path(dir_okay=False), section="Output", help="Write the comparison here.")
@debug_option
@_friendly
def report(**kw):
    """Re-render the report (tables, plots) from the manifest, or compare several conversions."""
    from .io.manifest import read_manifest
    from .report import compare, write_report

    if len(kw["in_paths"]) == 1:
        for p in write_report(kw["in_paths"][0], read_manifest(kw["in_paths"][0])):
            click.echo(f"wrote {p}")
    else:
        click.echo(compare(list(kw["in_paths"]), kw["out"]))


@main.command(name="eval", cls=_Sectioned)
@_opt("--original", required=True, section="Input", help="The source checkpoint directory.")
@_opt("--converted", required=True, section="Input", help="The lplr-convert output directory.")
@_opt("--text", default=None, type=click.Path(dir_okay=False, exists=True), section="Input",
      help="Text file, one sentence per line (default: sentences shipped with the package).")
@_opt("--device", default="cpu", show_default=True, section="Run", help="cpu, cuda or auto.")
@_opt("--max-texts", type=int, default=256, show_default=True, section="Run", help="Use at most this many lines.")
@_opt("--json", "as_json", is_flag=True, section="Output", help="Print the result as JSON.")
@debug_option
@_friendly
def eval_(**kw):
    """Run original and converted models on text; report embedding cosine or perplexity and KL (saved in the report)."""
    import json

    from .evaluate import evaluate
    from .report.tables import eval_items

    result = evaluate(kw["original"], kw["converted"], kw["text"], device=kw["device"], max_texts=kw["max_texts"])
    if kw["as_json"]:
        click.echo(json.dumps(result, indent=2))
        return
    for label, value in eval_items(result):
        click.echo(f"{label:<42} {value}")


@main.command(cls=_Sectioned)
@_opt("--in-path", required=True, section="Input", help="An lplr-convert output directory.")
@_opt("--repo-id", required=True, section="Hub", help="OWNER/NAME on the Hub.")
@_opt("--private", is_flag=True, section="Hub", help="Create the repo as private.")
@_opt("--revision", default=None, section="Hub", help="Branch to push to.")
@_opt("--commit-message", default=None, section="Hub", help="Commit message.")
@_opt("--token", default=None, section="Hub", help="Hub token (else HF_TOKEN or the login cache). Never printed.")
@_opt("--dry-run", is_flag=True, section="Hub", help="List files and the model card; send nothing.")
@debug_option
@_friendly
def push(**kw):
    """Push a converted directory to the Hugging Face Hub with a generated model card."""
    from .hub import push as run

    result = run(kw["in_path"], kw["repo_id"], private=kw["private"], revision=kw["revision"],
                 commit_message=kw["commit_message"], token=kw["token"], dry_run=kw["dry_run"])
    if not kw["dry_run"]:
        click.echo(f"pushed {len(result.get('files', []))} files to {result.get('url', kw['repo_id'])}")


@main.command(cls=_Sectioned)
@_opt("--in-path", required=True, section="Input", help="An lplr-convert output directory.")
@_opt("--source", default=None, section="Input", help="The original checkpoint: recompute a sample of errors.")
@_opt("--sample", type=int, default=8, show_default=True, section="Run", help="Tensors whose error is recomputed.")
@debug_option
@_friendly
def verify(**kw):
    """Check every output file's sha256 and every stored tensor against the manifest (and errors vs --source)."""
    from .verify import verify as run

    result = run(kw["in_path"], kw["source"], kw["sample"])
    extra = f", {len(result['errors_checked'])} errors recomputed" if kw["source"] else ""
    click.echo(f"ok: {result['files']} files and {result['tensors']} tensors match the manifest{extra}")


if __name__ == "__main__":
    main()
