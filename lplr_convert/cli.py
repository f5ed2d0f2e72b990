"""Command line: each command parses its options and calls one library function.

The method and knob options of `convert` and `inspect` are generated from the registered methods' settings
declarations (see `methods.settings.knob`), so a newly registered method's knobs appear here without an edit.
"""

from __future__ import annotations

import errno
import os
import shlex
import sys
from functools import wraps

import click
from loguru import logger

from . import __version__
from . import constants as C
from .errors import LplrError, flag
from .pipeline.options import RANK_SECTION, DeviceType, SizeType

SECTION_ORDER = ("Input", "Output", "Method", RANK_SECTION, "Selection", "Run", "Hub", "Other")


class _Opt(click.Option):
    """An option that remembers its help section (and, for a method's knob, the methods declaring it)."""

    def __init__(self, *args, section: str = "Other", knob_of: set[str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.section, self.knob_of = section, knob_of


class _Sectioned(click.Command):
    """Help output grouped by section."""

    def shown(self, ctx, param) -> bool:
        """Whether `--help` lists `param`."""
        return True

    def format_options(self, ctx, formatter):
        sections: dict[str, list] = {}
        for p in self.get_params(ctx):
            rec = p.get_help_record(ctx) if self.shown(ctx, p) else None
            if rec:
                sections.setdefault(getattr(p, "section", "Other"), []).append(rec)
        order = {name: i for i, name in enumerate(SECTION_ORDER)}
        for name, rows in sorted(sections.items(), key=lambda kv: order.get(kv[0], len(order))):
            with formatter.section(name):
                formatter.write_dl(rows)


def _knob_params(method: str | None = None) -> list[click.Parameter]:
    """`--method`, one option per knob of the registered methods, and one per rank policy kind; each knob option
    knows the methods that declare it (`knob_of`), and shows `method`'s default when one is given."""
    from .methods import all_knobs, available_methods, get_method
    from .methods.base import knob_defaults
    from .methods.settings import RANK_HELP, knob_fields

    methods = [m for m in available_methods() if m != "copy"]
    owners: dict[str, set[str]] = {}
    for m in methods:
        for f in knob_fields(get_method(m).settings_cls):
            owners.setdefault(f.name, set()).add(m)
    params: list[click.Parameter] = [_Opt(["--method"], type=click.Choice(methods), default="lplr", show_default=True,
                                          section="Method", help="Compression method for the selected weights.")]
    for name, f in all_knobs().items():
        meta = f.metadata
        if meta.get("rank_policy"):
            continue
        defaults = knob_defaults(name)
        text = f"{meta['help']} {_default_text({method: defaults[method]} if method in defaults else defaults)}"
        if meta["type"] is bool:
            params.append(_Opt([f"{flag(name)}/--no-{flag(name)[2:]}", name], default=None, section=meta["section"],
                               help=text, knob_of=owners.get(name, set())))
            continue
        kind = click.Choice([str(c) for c in meta["choices"] if c is not None]) if meta["choices"] else \
            {int: click.INT, float: click.FLOAT}.get(meta["type"], click.STRING)
        params.append(_Opt([flag(name), name], type=kind, default=None, section=meta["section"], help=text,
                           knob_of=owners.get(name, set())))
    ranked = {m for m in methods if get_method(m).uses_rank}
    for kind, (text, typ) in RANK_HELP.items():
        params.append(_Opt([flag(kind), kind], type=typ, default=None, section=RANK_SECTION, help=text,
                           knob_of=ranked))
    return params


def _method_in(args: list[str]) -> str | None:
    """The registered method `--method` names among raw arguments, if any (help is shown before parsing)."""
    from .methods import available_methods

    for i, a in enumerate(args):
        value = args[i + 1] if a == "--method" and i + 1 < len(args) else a[9:] if a.startswith("--method=") else None
        if value in available_methods():
            return value
    return None


def _default_text(defaults: dict) -> str:
    """"[default: 8]", or each method's own default when they differ."""
    values = {repr(v) for v in defaults.values()}
    if len(values) == 1:
        value = next(iter(defaults.values()))
        return "" if value is None else f"[default: {value}]"
    return "[default: " + ", ".join(f"{m} {v}" for m, v in defaults.items()) + "]"


class _PlanCommand(_Sectioned):
    """A command that takes the run options of its name and the method, knob and rank options (generated when the
    command runs)."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        method = ctx.meta.get("lplr_method")
        return _run_params(self.name) + params[:-1] + _knob_params(method) + params[-1:]  # help stays last

    def parse_args(self, ctx, args):
        ctx.meta["lplr_method"] = _method_in(args)  # before --help (eager) is acted on
        return super().parse_args(ctx, args)

    def shown(self, ctx, param) -> bool:
        """A knob is listed with `--method X --help` when X declares it, never in the plain `--help` (which lists the
        methods instead)."""
        owners = getattr(param, "knob_of", None)
        return owners is None or ctx.meta.get("lplr_method") in owners

    def format_options(self, ctx, formatter):
        super().format_options(ctx, formatter)
        if ctx.meta.get("lplr_method") is None:
            from .methods import available_methods, get_method

            with formatter.section("Methods (--method NAME --help lists NAME's knobs)"):
                formatter.write_dl([(m, get_method(m).summary()) for m in available_methods() if m != "copy"])


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


def _opt(*decls, section="Other", **kw):
    return click.option(*decls, cls=_Opt, section=section, **kw)


def _run_params(command: str) -> list[click.Parameter]:
    """The run options of `command` (`convert` or `inspect`), generated from their declarations
    (`pipeline.options.ConvertOptions`) when the command runs."""
    from .pipeline.options import option_fields

    params: list[click.Parameter] = []
    for fd in option_fields(command):
        m = fd.metadata
        name = m["flag"] or fd.name
        kw = {"help": m["help"], "section": m["section"]}
        if m["is_flag"]:
            kw["is_flag"] = True
        elif m["required"]:
            kw["required"] = True
        else:
            kw["default"] = m["cli_default"] if m["cli_default"] is not None else fd.default
            kw["show_default"] = m["show_default"]
        if m["click_type"] is not None:
            kw["type"] = m["click_type"]
        params.append(_Opt([flag(name), name], **kw))
    return params


def _layer(kw: dict) -> dict:
    """The flat settings layer from the command line: the method, every knob, and the one rank policy given."""
    from .methods import RANK_POLICIES, all_knobs, flat_defaults
    from .methods.base import overlay

    given = {k: kw[k] for k in (*all_knobs(), *RANK_POLICIES) if kw.get(k) is not None}
    layer = overlay(flat_defaults(), {"method": kw["method"], **given})
    if not kw.get("recipe"):
        _warn_unused(kw["method"], list(given))
    return layer


def _warn_unused(method: str, given: list[str]) -> None:
    from .methods import RANK_POLICIES, get_method
    from .methods.settings import knob_fields

    impl = get_method(method)
    own = {f.name for f in knob_fields(impl.settings_cls)} | (set(RANK_POLICIES) if impl.uses_rank else set())
    unused = [flag(k) for k in given if k not in own]
    if unused:
        logger.warning(f"{', '.join(unused)} do(es) not apply to --method {method} and is ignored")


def _options(kw: dict, which: str, **values):
    """The ConvertOptions of command `which` from click's arguments (see `_run_params`)."""
    from .pipeline.options import ConvertOptions

    return ConvertOptions.from_cli(kw, which, layer=_layer(kw), **values)


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
        except KeyboardInterrupt as e:
            click.echo(str(e) or "interrupted; convert and calibrate continue later with --resume", err=True)
            sys.exit(130)
        except Exception as e:
            if debug:
                raise
            if isinstance(e, OSError) and e.errno == errno.ENAMETOOLONG:
                click.echo(f"error: a path is too long for the file system ({str(e.filename)[:80]}...); choose a "
                           f"shorter path", err=True)
                sys.exit(1)
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
@_opt("--push-to", default=None, section="Hub", help="After converting, push to this Hub repo (OWNER/NAME).")
@_opt("--token", default=None, section="Hub", help="Hub token (else HF_TOKEN or the login cache). Never printed.")
@_opt("--private", is_flag=True, section="Hub", help="Create the Hub repo as private.")
@debug_option
@_friendly
def convert(**kw):
    """Convert a checkpoint (the default command)."""
    from .pipeline.convert import convert as run

    command = "lplr-convert " + " ".join(shlex.quote(a) for a in _redacted(sys.argv[1:]))
    if kw["devices"] and click.get_current_context().get_parameter_source("device") == \
            click.core.ParameterSource.COMMANDLINE:
        raise LplrError("--device and --devices contradict each other; pass one of them")
    manifest = run(_options(kw, "convert", command=command))
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
@_opt("--sensitivity-samples", type=click.IntRange(min=0), default=0, show_default=True, section="Run",
      help="Causal LMs: after the statistics, run the whole model forward and backward on this many samples and store "
           "each linear's output sensitivity (squared loss gradients per output channel); a --target-bits-per-param "
           "budget then spends bits where the loss needs them. Needs the model to fit on --device. 0: off.")
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
                   resume=kw["resume"], sensitivity_samples=kw["sensitivity_samples"])
    click.echo(f"wrote {len(manifest['statistics'])} statistics for {len(manifest['weights'])} weights "
               f"({manifest['samples']} samples, {manifest['tokens']} tokens) to {kw['out_path']}")


@main.command(cls=_PlanCommand)
@_opt("--json", "as_json", is_flag=True, section="Output", help="Print JSON instead of a table.")
@debug_option
@_friendly
def inspect(**kw):
    """Show what a checkpoint holds, what each tensor would get, and the predicted output size: convert's own plan
    (compresses nothing; with --target-bits-per-param it reads every compressed tensor once to allocate, as convert
    does)."""
    import json

    from .pipeline.inspect import inspect_checkpoint

    info = inspect_checkpoint(_options(kw, "inspect"))
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


class _ExportFormats(click.Choice):
    """The registered export formats (`export.register_format`), looked up when the command runs."""

    def __init__(self):
        super().__init__(())

    @property
    def choices(self):
        from .export import export_formats

        return tuple(export_formats())

    @choices.setter
    def choices(self, value):
        pass


@main.command(name="export", cls=_Sectioned)
@_rewrite_options("export", shards="Largest output shard (compressed-tensors).")
@_opt("--format", "fmt", required=True, type=_ExportFormats(), section="Output",
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
    """Push a converted directory to the Hugging Face Hub with a generated model card.

    Each wait for the Hub gives up after LPLR_NETWORK_TIMEOUT seconds (default 60) without an answer.
    """
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
@_opt("--full", is_flag=True, section="Run", help="Decode every tensor whole (default: its parts, cheaply).")
@debug_option
@_friendly
def verify(**kw):
    """Check every byte of the manifest, every file in the output, every record's parts (and the source by sha256 and
    errors vs --source)."""
    from .verify import verify as run

    result = run(kw["in_path"], kw["source"], kw["sample"], full=kw["full"])
    extra = f", {len(result['errors_checked'])} errors recomputed" if kw["source"] else ""
    click.echo(f"ok: {result['files']} files and {result['tensors']} tensors match the manifest{extra}")


if __name__ == "__main__":
    main()
