"""User-facing errors: each carries a one-line message the CLI prints before exiting non-zero."""

from __future__ import annotations


class DiffemError(Exception):
    """A problem with the user's input or files, reported as one line (exit code 2)."""

    exit_code = 2
