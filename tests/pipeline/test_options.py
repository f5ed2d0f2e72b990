"""Run options declared once: one field of ConvertOptions reaches --help, validation, the fingerprint and the manifest."""

from __future__ import annotations

from dataclasses import dataclass

import click
import pytest
from lplr_testing import error_line, run_cli

from lplr_convert import LplrError
from lplr_convert.errors import flag
from lplr_convert.io import writer
from lplr_convert.io.manifest import read_manifest
from lplr_convert.pipeline import options


def _check_wobble(key, value):
    if not isinstance(value, int) or isinstance(value, bool) or value > 9:
        raise LplrError(f"{options.opt(key)} {value!r} must be an integer up to 9")


@pytest.fixture
def wobble(monkeypatch):
    """A throw-away run option, declared as one field and nothing else."""

    @dataclass(frozen=True)
    class WithWobble(options.ConvertOptions):
        wobble: int = options.run_option(0, click_type=click.IntRange(min=0), validate=_check_wobble,
                                         fingerprint=True, record=True, help="A throw-away option of a test.")

    monkeypatch.setattr(options, "ConvertOptions", WithWobble)
    return WithWobble


def test_a_run_option_declared_once_reaches_help_validation_fingerprint_and_manifest(wobble, tiny_llama_dir,
                                                                                   tmp_path, monkeypatch):
    assert "--wobble" not in run_cli("inspect", "--help").output  # offered by `convert` only (its `commands`)
    assert "A throw-away option of a test." in run_cli("convert", "--help").output
    with pytest.raises(LplrError, match="wobble 10 must be an integer up to 9"):  # validation, library too
        wobble(in_path="x", out_path="y", wobble=10)
    error_line(run_cli("--in-path", str(tiny_llama_dir), "--out-path", str(tmp_path / "o"), "--wobble", "10"),
               "--wobble 10 must be an integer up to 9")

    out = tmp_path / "out"
    args = ["--in-path", str(tiny_llama_dir), "--out-path", str(out), "--max-shard-size", "30KB", "--no-report"]
    orig, calls = writer.ShardWriter.add_group, [0]

    def add_group(self, *a, **k):  # interrupted mid-run
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return orig(self, *a, **k)

    monkeypatch.setattr(writer.ShardWriter, "add_group", add_group)
    assert run_cli(*args, "--wobble", "1").exit_code == 130
    monkeypatch.setattr(writer.ShardWriter, "add_group", orig)
    error_line(run_cli(*args, "--wobble", "2", "--resume"), "--wobble changed", "was 1, now 2")  # the fingerprint
    assert run_cli(*args, "--wobble", "1", "--resume").exit_code == 0
    assert read_manifest(out)["options"]["wobble"] == 1  # the manifest


def test_options_of_convert_and_inspect_come_from_the_declarations():
    from lplr_convert.report.spectra import SPECTRA_MODES

    spectra = next(f for f in options.option_fields("convert") if f.name == "spectra")
    assert tuple(spectra.metadata["click_type"].choices) == SPECTRA_MODES
    inspect_help = run_cli("inspect", "--help").output
    convert_help = run_cli("convert", "--help").output
    for f in options.option_fields("inspect"):
        assert flag(f.name) in inspect_help and flag(f.name) in convert_help
    for f in options.option_fields("convert"):
        assert flag(f.metadata["flag"] or f.name) in convert_help
