"""Torch's CPU thread count for a ``diffem`` command.

``diffem --threads N COMMAND ...`` or ``DIFFEM_THREADS=N`` sets it; without either, the console
command uses :data:`DEFAULT_THREADS` (chosen by ``bench/bench_speed.py``'s thread study on a
2-core machine, idle and with another job beside it; see the README). Library use
(``import diffem_cli``) leaves torch's own setting alone.
"""

from __future__ import annotations

import os

from diffem_cli.errors import DiffemError

THREADS_ENV = "DIFFEM_THREADS"
DEFAULT_THREADS = 1
"""One thread: OpenMP threads spin while waiting for each other, so a second thread that has to
share its core with another job slows every step down instead of speeding it up."""


def parse_threads(value: str | int, what: str = "--threads") -> int:
    """A thread count >= 1 from ``value`` (``all`` or ``0``: every core this process may use)."""
    text = str(value).strip().lower()
    if text in ("all", "0"):
        return max(
            1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        )
    try:
        n = int(text)
    except ValueError:
        raise DiffemError(f"{what} must be a number of threads >= 1 or 'all', got {value!r}") from None
    if n < 1:
        raise DiffemError(f"{what} must be >= 1 (or 0 / 'all' for every core), got {value!r}")
    return n


def set_threads(value: str | int | None = None) -> int:
    """Set torch's intra-op threads from ``value``, else ``DIFFEM_THREADS``, else the default;
    returns the count set."""
    import torch

    if value is not None:
        n = parse_threads(value)
    elif os.environ.get(THREADS_ENV, "").strip():
        n = parse_threads(os.environ[THREADS_ENV], THREADS_ENV)
    else:
        n = DEFAULT_THREADS
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
