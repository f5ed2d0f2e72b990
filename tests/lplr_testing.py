"""Helpers shared by the tests (a uniquely named module, so it never collides with a conftest)."""

from __future__ import annotations


def run_cli(*args: str):
    """Run the real CLI in-process through click's runner; returns the click Result."""
    from click.testing import CliRunner

    from lplr_convert.cli import main

    return CliRunner().invoke(main, list(args), catch_exceptions=False)
