"""Checks of configuration values that raise one-line errors naming the key: ranges, choices,
finite numbers. Every configuration section validates itself with these; the command line checks
its options with the same rules by naming them ``--option`` (see :func:`named`)."""

from __future__ import annotations

import difflib
import math
from typing import Any

from diffem_cli.core.errors import DiffemError


def named(path: str) -> str:
    """How an error names ``path``: a command-line option (``--batch_size``) as the user types it
    (``--batch-size``), anything else as a config key."""
    return path.replace("_", "-") if path.startswith("--") else f"config key {path!r}"


def bad(path: str, value: Any, rule: str) -> DiffemError:
    """The error for config key (or option) ``path`` holding ``value``, which must be ``rule``."""
    return DiffemError(f"{named(path)} must be {rule}, got {value!r}")


def int_at_least(path: str, value: Any, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        raise bad(path, value, f"an integer in [{lo}, {hi}]" if hi is not None else f"an integer >= {lo}")


def finite(path: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise bad(path, value, "a finite number")
    return float(value)


def choice(path: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise DiffemError(f"{named(path)} must be one of {', '.join(choices)}, got {value!r}{hint}")
