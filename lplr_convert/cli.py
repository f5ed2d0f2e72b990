"""Command line: each command parses its options and calls one library function.

The method and knob options of `convert` and `inspect` are generated from the registered methods' settings
declarations (see `methods.settings.knob`), so a newly registered method's knobs appear here without an edit.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import sys
from functools import wraps

import click
from loguru import logger

from . import __version__
from . import constants as C
from .errors import LplrError, flag

RANK_SECTION = "Rank policy (one of)"
SECTION_ORDER = ("Input", "Output", "Method", RANK_SECTION, "Selection", "Run", "Hub", "Other")
_SIZE_UNITS = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40, "KB": 10**3, "MB": 10**6, "GB": 10**9,
               "TB": 10**12, "K": 10**3, "M": 10**6, "G": 10**9, "B": 1}


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
        order = {name: i for i, name in enumerate(SECTION_ORDER)}
        for name, rows in sorted(sections.items(), key=lambda kv: order.get(kv[0], len(order))):
            with formatter.section(name):
                formatter.write_dl(rows)


def _knob_params() -> list[click.Parameter]:
    """`--method`, one option per knob of the registered methods, and one per rank policy kind."""
    from .methods import all_knobs, available_methods
    from .methods.base import knob_defaults
    from .methods.settings import RANK_HELP

    methods = [m for m in available_methods() if m != "copy"]
    params: list[click.Parameter] = [_Opt(["--method"], type=click.Choice(methods), default="lplr", show_default=True,
                                          section="Method", help="Compression method for the selected weights.")]
    for name, f in all_knobs().items():
        meta = f.metadata
        if meta.get("rank_policy"):
            continue
        text = f"{meta['help']} {_default_text(knob_defaults(name))}"
        if meta["type"] is bool:
            params.append(_Opt([f"{flag(name)}/--no-{flag(name)[2:]}", name], default=None, section=meta["section"],
                               help=text))
            continue
        kind = click.Choice([str(c) for c in meta["choices"] if c is not None]) if meta["choices"] else \
            {int: click.INT, float: click.FLOAT}.get(meta["type"], click.STRING)
        params.append(_Opt([flag(name), name], type=kind, default=None, section=meta["section"], help=text))
    for kind, (text, typ) in RANK_HELP.items():
        params.append(_Opt([flag(kind), kind], type=typ, default=None, section=RANK_SECTION, help=text))
    return params


def _default_text(defaults: dict) -> str:
    """"[default: 8]", or each method's own default when they differ."""
    values = {repr(v) for v in defaults.values()}
    if len(values) == 1:
        value = next(iter(defaults.values()))
        return "" if value is None else f"[default: {value}]"
    return "[default: " + ", ".join(f"{m} {v}" for m, v in defaults.items()) + "]"


class _PlanCommand(_Sectioned):
    """A command that takes the method, knob and rank options (generated when the command runs)."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        return params[:-1] + _knob_params() + params[-1:]  # help stays last


class _DefaultGroup(click.Group):
    """`lplr-convert --in-path ...` means `lplr-convert convert --in-path ...`; a usage error is one `error:` line."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except click.ClickException as e:
            click.echo(f"error: {e.format_message()} (see --help)", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("interrupted", err=True)
            sys.exit(130)
        sys.exit(code or 0)

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["convert", *args]
        return super().parse_args(ctx, args)


class SizeType(click.ParamType):
    """A byte size: '5GB', '500MB', '2GiB' or a plain byte count."""

    name = "size"

    def convert(self, value, param, ctx):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        text = str(value).strip().upper().replace(" ", "")
        unit = next((u for u in _SIZE_UNITS if text.endswith(u)), "")
        number = text[: len(text) - len(unit)]
        try:
            amount = float(number) * _SIZE_UNITS.get(unit, 1)
        except ValueError:
            amount = math.nan
        if not re.fullmatch(r"[0-9]*\.?[0-9]+(E[+-]?[0-9]+)?", number) or not math.isfinite(amount) or amount < 1:
            self.fail(f"{value!r} is not a positive size; use e.g. 5GB, 500MB or a byte count", param, ctx)
        return int(amount)


class DeviceType(click.ParamType):
    """cpu, cuda, cuda:N or auto, checked against this machine."""

    name = "device"

    def convert(self, value, param, ctx):
        from .devices import resolve_device

        try:
            resolve_device(value)
        except LplrError as e:
            self.fail(e.cli_message(), param, ctx)
        return value


def _opt(*decls, section="Other", **kw):
    return click.option(*decls, cls=_Opt, section=section, **kw)


def selection_options(f):
    """Selection and recipe options shared by `convert` and `inspect`."""
    opts = [
        _opt("--include", default=None, section="Selection", help="Regex: compress the 2-D float tensors it matches."),
        _opt("--exclude", default=None, section="Selection", help="Regex: leave matching tensors alone."),
        _opt("--layers", default=None, section="Selection", help="Block indices, e.g. '0,3,5-7' (-1 = all)."),
        _opt("--types", default=None, section="Selection",
             help="LASER matrix types: fc_in, fc_out, fc_up, mlp, q_proj, k_proj, v_proj, out_proj, attn."),
        _opt("--recipe", type=click.Path(dir_okay=False), default=None, section="Selection",
             help="YAML/JSON rules: pattern/layers/types -> method + settings."),
        _opt("--target-bits-per-param", type=click.FloatRange(min=0, min_open=True, max=64), default=None,
             section=RANK_SECTION, help="Global budget: each tensor's rank/width allocated so the compressed tensors "
                                        "average at most this many stored bits/param."),
        _opt("--calibration", type=click.Path(file_okay=False), default=None, section="Method",
             help="STATS from `lplr-convert calibrate` of this checkpoint: activation-aware methods, output errors."),
        _opt("--revision", default=None, section="Input", help="Hub revision when --in-path is a repo id."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _layer(kw: dict) -> dict:
    """The flat settings layer from the command line: the method, every knob, and the one rank policy given."""
    from .methods import RANK_POLICIES, all_knobs, flat_defaults
    from .methods.base import overlay

    given = {k: kw[k] for k in (*all_knobs(), *RANK_POLICIES) if kw.get(k) is not None}
    layer = overlay(flat_defaults(), {"method": kw["method"], **given})
    if not kw.get("recipe"):
        _warn_unused(kw["method"], [k for k in given if k not in RANK_POLICIES])
    return layer


def _warn_unused(method: str, given: list[str]) -> None:
    from .methods import get_method
    from .methods.settings import knob_fields

    own = {f.name for f in knob_fields(get_method(method).settings_cls)}
    unused = [flag(k) for k in given if k not in own]
    if unused:
        logger.warning(f"{', '.join(unused)} do(es) not apply to --method {method} and is ignored")


def _options(kw, **extra):
    from .pipeline.convert import ConvertOptions
    from .methods import settings_from_flat

    layer = _layer(kw)
    return ConvertOptions(in_path=kw["in_path"], out_path=extra.pop("out_path", ""), settings=settings_from_flat(layer),
                          defaults=layer, include=kw["include"], exclude=kw["exclude"], layers=kw["layers"],
                          types=kw["types"], recipe=kw["recipe"], revision=kw["revision"],
                          calibration=kw["calibration"], target_bits_per_param=kw["target_bits_per_param"], **extra)


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
            click.echo(f"error: {e.cli_message()}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted; convert and calibrate continue later with --resume", err=True)
            sys.exit(130)
        except Exception as e:
            if debug:
                raise
            text = str(e).strip().splitlines()[0] if str(e).strip() else ""
            click.echo(f"error: unexpected {type(e).__name__}: {text[:300]} (re-run with --debug for details)",
                       err=True)
            sys.exit(1)

    return run


debug_option = _opt("--debug", is_flag=True, section="Other", help="Show tracebacks and debug logs.")


def hub_options(f):
    """--private, --token and --base-model, shared by `convert --push-to` and `push`."""
    f = _opt("--base-model", default=None, section="Hub",
             help="Hub repo id the model card names as base_model (default: found from the source).")(f)
    f = _opt("--token", default=None, section="Hub",
             help="Hub token (else HF_TOKEN or the login cache). Never printed.")(f)
    return _opt("--private", is_flag=True, section="Hub", help="Create the Hub repo as private.")(f)


@click.group(cls=_DefaultGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="lplr-convert")
def main():
    """Compress Hugging Face checkpoints with low-rank, low-precision factorizations.

    `lplr-convert --in-path SRC --out-path DST ...` runs the `convert` command.
    """


@main.command(cls=_PlanCommand)
@_opt("--in-path", required=True, section="Input",
      help="Checkpoint dir, .safetensors/.bin file, Hub repo id, or bundled:all-MiniLM-L6-v2.")
@_opt("--out-path", required=True, type=click.Path(file_okay=False), section="Output", help="Output directory.")
@selection_options
@_opt("--device", type=DeviceType(), default="auto", show_default=True, section="Run",
      help="cpu, cuda, cuda:N or auto (the GPU when there is one).")
@_opt("--devices", default=None, section="Run",
      help="Devices of worker processes: cpu, or cuda:0,cuda:1,... (one worker each unless --workers).")
@_opt("--workers", type=click.IntRange(min=1), default=None, section="Run",
      help="Worker processes compressing tensors in parallel (default: one per --devices entry; 1 = this process).")
@_opt("--threads", type=click.IntRange(min=1), default=None, section="Run",
      help="torch threads per tensor (default: cores / workers). CPU results depend on it in the last bits: runs "
           "with the same --threads are byte-identical, whatever --workers.")
@_opt("--ray-address", default=None, section="Run",
      help="Compress on a Ray cluster: auto, HOST:PORT, or local (a private instance here). Every node must see "
           "--in-path at the same path. Needs the ray extra.")
@_opt("--seed", type=int, default=0, show_default=True, section="Run",
      help="Global seed (per-tensor seeds derive from it).")
@_opt("--max-shard-size", type=SizeType(), default="5GB", show_default=True, section="Output",
      help="Largest output shard, e.g. 5GB, 500MB.")
@_opt("--overwrite", is_flag=True, section="Output", help="Replace an earlier lplr-convert output in --out-path.")
@_opt("--resume", is_flag=True, section="Output", help="Continue an interrupted conversion with the same settings.")
@_opt("--on-nonfinite", type=click.Choice(["error", "copy"]), default="error", show_default=True, section="Run",
      help="A weight with NaN/Inf: stop with an error, or copy it verbatim.")
@_opt("--no-report", is_flag=True, section="Output", help="Skip the report files and plots.")
@_opt("--spectra", type=click.Choice(["estimate", "exact", "off"]), default="estimate", show_default=True,
      section="Output", help="The report's energy curves: estimate (from the singular values the method computed; "
      "none for lplr/rtn), exact (one Gram eigendecomposition per plotted tensor), or off.")
@_opt("--push-to", default=None, section="Hub", help="After converting, push to this Hub repo (OWNER/NAME).")
@hub_options
@debug_option
@_friendly
def convert(**kw):
    """Convert a checkpoint (the default command)."""
    from .pipeline.convert import convert as run

    command = "lplr-convert " + " ".join(shlex.quote(a) for a in _redacted(sys.argv[1:]))
    if kw["devices"] and click.get_current_context().get_parameter_source("device") == \
            click.core.ParameterSource.COMMANDLINE:
        raise LplrError("--device and --devices contradict each other; pass one of them")
    opts = _options(kw, out_path=kw["out_path"], seed=kw["seed"], device=kw["device"],
                    max_shard_size=kw["max_shard_size"], overwrite=kw["overwrite"], resume=kw["resume"],
                    on_nonfinite=kw["on_nonfinite"], command=command, write_report=not kw["no_report"],
                    base_model=kw["base_model"], spectra=kw["spectra"], workers=kw["workers"], devices=kw["devices"],
                    threads=kw["threads"], ray_address=kw["ray_address"])
    manifest = run(opts)
    _print_summary(manifest, kw["out_path"])
    if kw["push_to"]:
        from .publish.hub import push

        result = push(kw["out_path"], kw["push_to"], private=kw["private"], token=kw["token"])  # card: manifest's
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
    from .report import summary_table

    click.echo(summary_table(manifest, manifest[C.M_SUMMARY]))  # computed once, by the conversion
    click.echo(f"wrote {out_path}")


@main.command(cls=_Sectioned)
@_opt("--in-path", required=True, section="Input",
      help="Checkpoint dir, .safetensors/.bin file, Hub repo id, or bundled:all-MiniLM-L6-v2.")
@_opt("--out-path", required=True, type=click.Path(file_okay=False), section="Output",
      help="Directory for the statistics (STATS).")
@_opt("--text", default=None, type=click.Path(dir_okay=False), section="Input",
      help=".txt (one sample per line) or .jsonl (a 'text' field per line), optionally .gz; default: text shipped "
           "with the package (sentences; for causal LMs also public-domain books, ~300k tokens).")
@_opt("--dataset", default=None, section="Input",
      help="NAME[:CONFIG][:SPLIT] read with the `datasets` library (extra 'datasets'): a local directory (save_to_disk, "
           "or .json/.jsonl/.parquet/.txt files) or a Hub dataset id; SPLIT defaults to train, e.g. "
           "wikitext:wikitext-2-raw-v1:train or ./corpus::validation.")
@_opt("--text-column", default=None, section="Input",
      help="Column of --dataset to read; default: 'text', else the only string column.")
@_opt("--samples", type=click.IntRange(min=1), default=128, show_default=True, section="Run",
      help="Calibration samples (sequences).")
@_opt("--seq-len", type=click.IntRange(min=2), default=512, show_default=True, section="Run",
      help="Tokens per sample at most.")
@_opt("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, section="Run",
      help="Samples per forward pass.")
@_opt("--accumulate-dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True,
      section="Run", help="Precision of the accumulated second moments (and of the stored statistics).")
@_opt("--device", type=DeviceType(), default="auto", show_default=True, section="Run",
      help="cpu, cuda, cuda:N or auto (the GPU when there is one); the STATS manifest records the device used.")
@_opt("--sequential", default=None, type=click.Path(dir_okay=False), section="Run",
      help="Sequential calibration: a recipe (YAML/JSON, as for convert --recipe) of how the blocks will be "
           "compressed; each block's statistics then come from the outputs of the blocks before it compressed that "
           "way (as llm-compressor does). Convert afterwards with the same --recipe and --calibration.")
@_opt("--overwrite", is_flag=True, section="Output", help="Replace earlier statistics in --out-path.")
@_opt("--resume", is_flag=True, section="Output",
      help="Continue an interrupted calibrate run in --out-path with the same settings (finished blocks are kept).")
@debug_option
@_friendly
def calibrate(**kw):
    """Run the original model block by block on calibration text and store each linear's input second moment."""
    from .calibration import calibrate as run
    from .dtypes import dtype_from_name

    sequential = None
    if kw["sequential"] is not None:
        from .pipeline.convert import ConvertOptions
        from .pipeline.sequential import CompressedBlocks

        sequential = CompressedBlocks(ConvertOptions(in_path=kw["in_path"], out_path="", recipe=kw["sequential"],
                                                     device=kw["device"]))
    manifest = run(kw["in_path"], kw["out_path"], sequential=sequential, text=kw["text"], dataset=kw["dataset"],
                   text_column=kw["text_column"], samples=kw["samples"], seq_len=kw["seq_len"],
                   batch_size=kw["batch_size"], device=kw["device"],
                   accumulate_dtype=dtype_from_name(kw["accumulate_dtype"]), overwrite=kw["overwrite"],
                   resume=kw["resume"])
    click.echo(f"wrote {len(manifest['statistics'])} statistics for {len(manifest['weights'])} weights "
               f"({manifest['samples']} samples, {manifest['tokens']} tokens) to {kw['out_path']}")


@main.command(cls=_PlanCommand)
@_opt("--in-path", required=True, section="Input", help="Checkpoint to inspect.")
@selection_options
@_opt("--json", "as_json", is_flag=True, section="Output", help="Print JSON instead of a table.")
@debug_option
@_friendly
def inspect(**kw):
    """Show what a checkpoint holds, what each tensor would get, and the predicted output size (computes nothing)."""
    import json

    from .pipeline.inspect import inspect_checkpoint

    info = inspect_checkpoint(_options(kw))
    if kw["as_json"]:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"{info['source']} ({info['kind']}, model_type={info['model_type']}, {len(info['tensors'])} tensors)")
    click.echo(f"{'tensor':<60} {'shape':>14} {'dtype':>8} {'rank':>6} {'MB in':>8} {'MB out':>8}  settings")
    for r in info["tensors"]:
        shape = "x".join(map(str, r["shape"]))
        out = "?" if r["predicted_bytes"] is None else f"{r['predicted_bytes'] / 1e6:8.3f}"
        flag_text = "  GROWS" if r["grows"] else ""
        click.echo(f"{r['name'][:60]:<60} {shape:>14} {r['dtype']:>8} {r['rank'] or ''!s:>6} "
                   f"{r['original_bytes'] / 1e6:8.3f} {out:>8}  {r['label']}{flag_text}")
    note = "" if info["exact"] else " (energy policy: ranks depend on the data, sizes of those tensors unknown)"
    click.echo(f"{info['n_compressed']} tensors to compress; weights {info['original_bytes'] / 1e6:.1f} MB -> "
               f"predicted output {info['predicted_output_bytes'] / 1e6:.1f} MB{note}")


def _rewrite_options(what: str, shards: str = "Largest output shard."):
    """--in-path (a converted directory), --out-path, --max-shard-size and --overwrite, for commands writing `what`."""
    opts = [_opt("--in-path", required=True, section="Input", help="An lplr-convert output directory."),
            _opt("--out-path", required=True, type=click.Path(file_okay=False), section="Output",
                 help=f"Where to write the {what}."),
            _opt("--max-shard-size", type=SizeType(), default="5GB", show_default=True, section="Output", help=shards),
            _opt("--overwrite", is_flag=True, section="Output", help=f"Replace an earlier {what} in --out-path.")]

    def wrap(f):
        for o in reversed(opts):
            f = o(f)
        return f

    return wrap


@main.command(cls=_Sectioned)
@_rewrite_options("plain checkpoint")
@debug_option
@_friendly
def decompress(**kw):
    """Write a plain Hugging Face checkpoint (original names, shapes, dtypes) from a converted directory."""
    from .export import decompress as run

    click.echo(f"wrote {run(kw['in_path'], kw['out_path'], kw['max_shard_size'], kw['overwrite'])}")


@main.command(name="export", cls=_Sectioned)
@_rewrite_options("export", shards="Largest output shard (compressed-tensors).")
@_opt("--format", "fmt", required=True, type=click.Choice(C.EXPORT_FORMATS), section="Output",
      help="compressed-tensors: packed checkpoint transformers/vLLM load; peft: qlr corrections as a LoRA adapter.")
@_opt("--base-model", default=None, section="Output",
      help="peft: the adapter's base_model_name_or_path (the compressed-tensors export's path or repo id).")
@debug_option
@_friendly
def export_(**kw):
    """Write a conversion in a format other tools load natively (compressed-tensors, PEFT LoRA); says what went dense."""
    from .export import export as run

    result = run(kw["in_path"], kw["out_path"], kw["fmt"], base_model=kw["base_model"],
                 max_shard_size=kw["max_shard_size"], overwrite=kw["overwrite"])
    for line in result.lines():
        click.echo(line)


@main.command(cls=_Sectioned)
@_opt("--in-path", "in_paths", required=True, multiple=True, section="Input",
      help="Output directory; repeat to compare several side by side.")
@_opt("--out", default=None, type=click.Path(dir_okay=False), section="Output", help="Write the comparison (or one directory's summary) to this file, outside the conversion directories.")
@debug_option
@_friendly
def report(**kw):
    """Re-render the report (tables, plots) from the manifest, or compare several conversions."""
    from .report import compare, render_report

    if len(kw["in_paths"]) == 1 and kw["out"] is None:
        for p in render_report(kw["in_paths"][0]):
            click.echo(f"wrote {p}")
    else:
        click.echo(compare(list(kw["in_paths"]), kw["out"]))


@main.command(name="eval", cls=_Sectioned)
@_opt("--original", required=True, section="Input", help="The source checkpoint directory.")
@_opt("--converted", required=True, section="Input", help="The lplr-convert output directory.")
@_opt("--text", default=None, type=click.Path(dir_okay=False, exists=True), section="Input",
      help="Text file, one sentence per line (default: sentences shipped with the package).")
@_opt("--device", type=DeviceType(), default="auto", show_default=True, section="Run",
      help="cpu, cuda, cuda:N or auto (the GPU when there is one).")
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
@hub_options
@_opt("--revision", default=None, section="Hub", help="Branch to push to.")
@_opt("--commit-message", default=None, section="Hub", help="Commit message.")
@_opt("--dry-run", is_flag=True, section="Hub", help="List files and the model card; send nothing.")
@debug_option
@_friendly
def push(**kw):
    """Push a converted directory to the Hugging Face Hub with a generated model card."""
    from .publish.hub import push as run

    result = run(kw["in_path"], kw["repo_id"], private=kw["private"], revision=kw["revision"],
                 commit_message=kw["commit_message"], token=kw["token"], dry_run=kw["dry_run"],
                 base_model=kw["base_model"])
    if not kw["dry_run"]:
        click.echo(f"pushed {len(result.get('files', []))} files to {result.get('url', kw['repo_id'])}")


@main.command(cls=_Sectioned)
@_opt("--in-path", required=True, section="Input", help="An lplr-convert output directory.")
@_opt("--source", default=None, section="Input", help="The original checkpoint: recompute a sample of errors.")
@_opt("--sample", type=click.IntRange(min=1), default=8, show_default=True, section="Run",
      help="Tensors whose error is recomputed.")
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
