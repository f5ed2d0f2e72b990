"""The run options of a conversion, declared once.

Every option of `convert` (and the plan options `inspect` shares) is a field of `ConvertOptions` made with
`run_option()`, the same trick as `methods.settings.knob()`: the field's metadata says its flag, help, section, click
type, which commands offer it, how it is validated, whether it decides the output's bytes (then the resume
fingerprint holds it) and whether the manifest's `options` records it. The command line (`cli.py`), validation
(`ConvertOptions.__post_init__`), the fingerprint (`fingerprint_options`) and the manifest (`recorded_options`) are
generated from these declarations, so adding a run option is one field here.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import click

from ..errors import LplrError, opt
from ..io.writer import DEFAULT_SHARD_BYTES
from ..report.spectra import SPECTRA_MODES
from .allocation import OBJECTIVES

__all__ = ["NONFINITE_CHOICES", "RANK_SECTION", "ConvertOptions", "DeviceType", "SizeType", "fingerprint_options",
           "option_fields", "recorded_options", "run_option"]

RANK_SECTION = "Rank policy (one of)"
NONFINITE_CHOICES = ("error", "copy")
_SIZE_UNITS = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40, "KB": 10**3, "MB": 10**6, "GB": 10**9,
               "TB": 10**12, "K": 10**3, "M": 10**6, "G": 10**9, "B": 1}
CONVERT, INSPECT = "convert", "inspect"
_BOTH = (CONVERT, INSPECT)


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
        from ..devices import resolve_device

        try:
            resolve_device(value)
        except LplrError as e:
            self.fail(e.cli_message(), param, ctx)
        return value


def run_option(default: Any = None, *, help: str, section: str = "Run", click_type: Any = None,
               commands: tuple[str, ...] = (CONVERT,), fingerprint: bool = False, record: bool = False,
               validate: Callable[[str, Any], None] | None = None, show_default: bool = False,
               cli_default: Any = None, is_flag: bool = False, flag: str | None = None, invert: bool = False,
               required: bool = False):
    """A `ConvertOptions` field with its declaration.

    help/section: its `--help` text and group; click_type: its click type (a click.ParamType or a Python type;
    `None` for text); commands: the commands offering it (() for a library-only option); fingerprint: it decides the
    output's bytes, so a resume with another value is refused, naming it; record: the manifest's `options` records
    it (under this key when a string); validate(key, value): raises LplrError for a bad value (also when the library
    is called directly); show_default/cli_default: the default as the command line shows and parses it (e.g. "5GB");
    is_flag: a boolean
    switch; flag: the switch's own name when it is not the field's (`--no-report` of write_report, with `invert`);
    required: the command line requires it.
    """
    meta = {"run_option": True, "help": help, "section": section, "click_type": click_type, "commands": commands,
            "fingerprint": fingerprint, "record": record, "validate": validate, "show_default": show_default,
            "cli_default": cli_default, "is_flag": is_flag, "flag": flag, "invert": invert, "required": required}
    if required:
        return field(metadata=meta)
    return field(default=default, metadata=meta)


# ------------------------------------------------------------------------------------------------------ validators


def _at_least(low: int) -> Callable[[str, Any], None]:
    def check(key: str, value: Any) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise LplrError(f"{opt(key)} {value!r} must be an integer of at least {low}")

    return check


def _one_of(choices: tuple[str, ...]) -> Callable[[str, Any], None]:
    def check(key: str, value: Any) -> None:
        if value not in choices:
            raise LplrError(f"{opt(key)} {value!r} is unknown; use one of {', '.join(choices)}")

    return check


def _check_target(key: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 64):
        raise LplrError(f"{opt(key)} {value!r} must be a number of bits/param in (0, 64)")


def _check_size(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise LplrError(f"{opt(key)} {value!r} must be a positive number of bytes")


def _check_repo_id(key: str, value: Any) -> None:
    if value is not None:
        from ..publish.hub import check_repo_id

        check_repo_id(value, what=opt(key))


_IN_PATH_HELP = ("Checkpoint dir, .safetensors/.bin file, Hub repo id, or bundled:all-MiniLM-L6-v2. A Hub download "
                 "gives up after LPLR_NETWORK_TIMEOUT seconds (default 60) without an answer.")


@dataclass(frozen=True)
class ConvertOptions:
    """Every option of a conversion, validated; `command` is the command line recorded in the manifest.

    `layer` is the method and knobs of the selected weights as a flat layer (the one form of settings, see
    `methods.base.overlay`: e.g. {"method": "rtn", "b0": 4}; the values given explicitly, which recipe rules start
    from and a global bit budget leaves alone), validated by the method's settings class on creation. The other
    fields are run options (`run_option`): see each one's help.
    """

    in_path: str = run_option(help=_IN_PATH_HELP, section="Input", commands=_BOTH, required=True)
    out_path: str = run_option(help="Output directory.", section="Output", click_type=click.Path(file_okay=False),
                               required=True)
    layer: Mapping[str, Any] | None = None  # None: the default method at its defaults
    # Selection (shared with `inspect`)
    include: str | None = run_option(None, section="Selection", commands=_BOTH, fingerprint=True, record=True,
                                     help="Regex: compress the 2-D float tensors it matches.")
    exclude: str | None = run_option(None, section="Selection", commands=_BOTH, fingerprint=True, record=True,
                                     help="Regex: leave matching tensors alone.")
    layers: str | None = run_option(None, section="Selection", commands=_BOTH, fingerprint=True, record=True,
                                    help="Block indices, e.g. '0,3,5-7' (-1 = all).")
    types: str | None = run_option(None, section="Selection", commands=_BOTH, fingerprint=True, record=True,
                                   help="LASER matrix types: fc_in, fc_out, fc_up, mlp, q_proj, k_proj, v_proj, "
                                        "out_proj, attn.")
    recipe: str | None = run_option(None, section="Selection", commands=_BOTH, fingerprint=True, record="recipe_path",
                                    click_type=click.Path(dir_okay=False),
                                    help="YAML/JSON rules: pattern/layers/types -> method + settings.")
    target_bits_per_param: float | None = run_option(
        None, section=RANK_SECTION, commands=_BOTH, fingerprint=True, validate=_check_target,
        click_type=click.FloatRange(min=0, min_open=True, max=64),
        help="Global budget: each tensor's rank/width allocated so the compressed tensors average at most this many "
             "stored bits/param.")
    budget_objective: str = run_option(
        "auto", section=RANK_SECTION, commands=_BOTH, fingerprint=True, record=True, show_default=True,
        click_type=click.Choice(OBJECTIVES),
        help="What --target-bits-per-param minimises: output-error (each tensor's relative output error weighed by "
             "its parameters), sensitivity (weighed by its effect on the loss: needs `calibrate "
             "--sensitivity-samples`), auto (sensitivity when the --calibration statistics carry it).")
    calibration: str | None = run_option(None, section="Method", commands=_BOTH, fingerprint=True, record=True,
                                         click_type=click.Path(file_okay=False),
                                         help="STATS from `lplr-convert calibrate` of this checkpoint: "
                                              "activation-aware methods, output errors.")
    revision: str | None = run_option(None, section="Input", commands=_BOTH,
                                      help="Hub revision when --in-path is a repo id.")
    # Run
    device: str = run_option("auto", click_type=DeviceType(), show_default=True, fingerprint=True, record=True,
                             help="cpu, cuda, cuda:N or auto (the GPU when there is one).")
    devices: str | None = run_option(None, fingerprint=True, record=True,
                                     help="Devices of worker processes: cpu, or cuda:0,cuda:1,... (one worker each "
                                          "unless --workers).")
    workers: int | None = run_option(None, click_type=click.IntRange(min=1), validate=_at_least(1), record=True,
                                     help="Worker processes compressing tensors in parallel (default: one per "
                                          "--devices entry; 1 = this process).")
    threads: int | None = run_option(None, click_type=click.IntRange(min=1), validate=_at_least(1), fingerprint=True,
                                     record=True,
                                     help="torch threads per tensor (default: cores / workers). CPU results depend on "
                                          "it in the last bits: runs with the same --threads are byte-identical, "
                                          "whatever --workers.")
    ray_address: str | None = run_option(None, help="Compress on a Ray cluster: auto, HOST:PORT, or local (a private "
                                                    "instance here). Every node must see --in-path at the same path. "
                                                    "Needs the ray extra. Joining gives up after "
                                                    "LPLR_NETWORK_TIMEOUT seconds (default 60) without an answer.")
    seed: int = run_option(0, click_type=int, show_default=True, fingerprint=True, record=True,
                           help="Global seed (per-tensor seeds derive from it).")
    on_nonfinite: str = run_option("error", click_type=click.Choice(NONFINITE_CHOICES), show_default=True,
                                   validate=_one_of(NONFINITE_CHOICES), fingerprint=True, record=True,
                                   help="A weight with NaN/Inf: stop with an error, or copy it verbatim.")
    retries: int = run_option(3, commands=(), validate=_at_least(0),
                              help="Attempts of a Ray task lost with its node.")
    # Output
    max_shard_size: int = run_option(DEFAULT_SHARD_BYTES, section="Output", click_type=SizeType(), cli_default="5GB",
                                     show_default=True, validate=_check_size, fingerprint=True, record=True,
                                     help="Largest output shard, e.g. 5GB, 500MB.")
    overwrite: bool = run_option(False, section="Output", is_flag=True,
                                 help="Replace an earlier lplr-convert output in --out-path.")
    resume: bool = run_option(False, section="Output", is_flag=True,
                              help="Continue an interrupted conversion with the same settings.")
    write_report: bool = run_option(True, section="Output", is_flag=True, flag="no_report", invert=True,
                                    help="Skip the report files and plots.")
    spectra: str = run_option("estimate", section="Output", click_type=click.Choice(SPECTRA_MODES), show_default=True,
                              validate=_one_of(SPECTRA_MODES), fingerprint=True,
                              record=True,
                              help="The report's energy curves: estimate (from the singular values the method "
                                   "computed; none for lplr/rtn), exact (one Gram eigendecomposition per plotted "
                                   "tensor), or off.")
    base_model: str | None = run_option(None, section="Hub", validate=_check_repo_id,
                                        help="Hub repo id the model card names as base_model (default: found from "
                                             "the source).")
    command: str | None = run_option(None, commands=(), record=True,
                                     help="The command line recorded in the manifest.")

    def __post_init__(self) -> None:
        from ..methods import flat_defaults, settings_from_flat
        from ..methods.base import overlay

        layer = overlay(flat_defaults(), self.layer or {})
        settings_from_flat(layer)  # validated by the method's settings class
        object.__setattr__(self, "layer", layer)
        if self.overwrite and self.resume:
            raise LplrError(f"{opt('overwrite')} and {opt('resume')} contradict each other; pass one of them")
        for f in option_fields():
            check = f.metadata["validate"]
            if check is not None:
                check(f.name, getattr(self, f.name))

    @classmethod
    def from_cli(cls, kw: Mapping[str, Any], which: str, **values: Any) -> ConvertOptions:
        """The options of command `which` from click's keyword arguments (each option under its field's or flag's name);
        `values` are the fields the command line does not give (the settings layer, the recorded command line)."""
        for f in option_fields(which):
            key = f.metadata["flag"] or f.name
            if key in kw:
                values[f.name] = (not kw[key]) if f.metadata["invert"] else kw[key]
        values.setdefault("out_path", "")
        return cls(**values)

    def device_list(self) -> list[str]:
        """The compute devices: `devices` split at commas, else `device`."""
        if self.devices is None:
            return [self.device]
        items = [d.strip() for d in str(self.devices).split(",") if d.strip()]
        if not items:
            raise LplrError(f"{opt('devices')} {self.devices!r} names no device; use e.g. cpu or cuda:0,cuda:1")
        return items

    def worker_count(self) -> int:
        """Worker processes (or Ray tasks under way): `workers`, else one per device."""
        return self.workers if self.workers is not None else len(self.device_list())


def option_fields(command: str | None = None) -> list[dataclasses.Field]:
    """The run options (of `command` when given), in declaration order."""
    return [f for f in dataclasses.fields(ConvertOptions) if f.metadata.get("run_option")
            and (command is None or command in f.metadata["commands"])]


def _values(opts: ConvertOptions, which: str, effective: Mapping[str, Any]) -> dict[str, Any]:
    """Key -> value of the run options with `which` set (the key: the field's name, or the string `which` holds),
    the run's effective value (`effective[field name]`, e.g. the threads a default resolved to) in place of the
    given one."""
    out = {}
    for f in option_fields():
        key = f.metadata[which]
        if key:
            out[key if isinstance(key, str) else f.name] = effective.get(f.name, getattr(opts, f.name))
    return out


def fingerprint_options(opts: ConvertOptions, effective: Mapping[str, Any]) -> dict[str, Any]:
    """The run options that decide the output's bytes (the resume fingerprint holds them)."""
    return _values(opts, "fingerprint", effective)


def recorded_options(opts: ConvertOptions, effective: Mapping[str, Any]) -> dict[str, Any]:
    """The run options the manifest's `options` records."""
    return _values(opts, "record", effective)
