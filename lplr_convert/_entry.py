"""The `lplr-convert` console script: the command line, with Ctrl-C during its start-up (importing torch takes
seconds) answered like Ctrl-C at any other time, in one line, instead of a traceback."""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from .cli import main as cli_main
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    cli_main()
