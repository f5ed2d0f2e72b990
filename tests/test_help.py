"""`convert --help` lists the methods one line each and fits in 100 lines; `convert --method X --help` shows the run
options and X's knobs only."""

from __future__ import annotations

import pytest
from lplr_testing import run_cli

from lplr_convert.errors import flag
from lplr_convert.methods import RANK_POLICIES, all_knobs, available_methods, get_method
from lplr_convert.methods.settings import knob_fields
from lplr_convert.pipeline.options import option_fields

METHODS = [m for m in available_methods() if m != "copy"]


def _flags(text: str) -> set[str]:
    return {w.split("/")[0].rstrip(",") for line in text.splitlines() for w in line.split() if w.startswith("--")}


def test_plain_help_lists_the_methods_and_fits_in_100_lines():
    text = run_cli("convert", "--help").output
    assert len(text.splitlines()) <= 100
    rows = {line.split()[0]: line for line in text.splitlines() if line.strip() and line.split()[0] in METHODS}
    assert set(rows) == set(METHODS)
    for m in METHODS:  # one line each, beginning with the method's own summary
        assert get_method(m).summary()[:30] in rows[m]
    assert not _flags(text) & {flag(k) for k in (*all_knobs(), *RANK_POLICIES)}
    assert {flag(f.metadata["flag"] or f.name) for f in option_fields("convert")} <= _flags(text)


@pytest.mark.parametrize("method", METHODS)
def test_method_help_shows_the_run_options_and_its_own_knobs_only(method):
    impl = get_method(method)
    text = run_cli("convert", "--method", method, "--help").output
    own = {flag(f.name) for f in knob_fields(impl.settings_cls) if not f.metadata.get("rank_policy")}
    if impl.uses_rank:
        own |= {flag(k) for k in RANK_POLICIES}
    others = {flag(k) for k in (*all_knobs(), *RANK_POLICIES)} - own
    shown = _flags(text)
    assert own <= shown and not shown & others
    assert {flag(f.metadata["flag"] or f.name) for f in option_fields("convert")} <= shown
