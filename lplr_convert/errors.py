"""The tool's own error type: a one-line message naming the problem and the fix."""


class LplrError(Exception):
    """A user-facing error. Its message is one line that names the problem and how to fix it."""


class IncompleteOutputError(LplrError):
    """An output directory without a complete manifest (an interrupted conversion)."""
