"""The tool's own error type: a one-line message naming the problem and the fix.

A message may name a setting with `opt("b1")`. The library shows it in its own terms (`b1`, also the recipe key); the
command line shows the flag (`--b1`), through `LplrError.cli_message`.
"""

from __future__ import annotations

import re

__all__ = ["IncompleteOutputError", "LplrError", "opt"]

_MARK = re.compile("\u27e6([A-Za-z0-9_]+)\u27e7")


def opt(key: str) -> str:
    """A setting's name inside an error message, rendered per audience (`b1` in the library, `--b1` on the CLI)."""
    return f"\u27e6{key}\u27e7"


def flag(key: str) -> str:
    """The command-line flag of a setting key: `group_size` -> `--group-size`."""
    return "--" + key.replace("_", "-")


class LplrError(Exception):
    """A user-facing error. Its message is one line that names the problem and how to fix it."""

    def __init__(self, message: str):
        self.template = str(message)
        super().__init__(_MARK.sub(lambda m: m.group(1), self.template))

    def __reduce__(self):  # pickled with its template, so that a worker's error still renders flags on the CLI
        return type(self), (self.template,)

    def cli_message(self) -> str:
        """The message with settings named by their command-line flags."""
        return _MARK.sub(lambda m: flag(m.group(1)), self.template)


class IncompleteOutputError(LplrError):
    """An output directory without a complete manifest (an interrupted conversion)."""
