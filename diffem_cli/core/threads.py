"""Torch's CPU threads for a ``diffem`` command.

``diffem --threads N COMMAND ...`` or ``DIFFEM_THREADS=N`` sets the count; without either, the
console command uses every core this process may use (:data:`DEFAULT_THREADS`). Before torch
loads, the command also makes waiting OpenMP threads sleep at once (:func:`openmp_wait_env`:
``OMP_WAIT_POLICY=PASSIVE``, unless ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` is set).
``bench/bench_speed.py``'s thread study on a shared 2-core machine chose it: with libgomp's
default spin (300,000 rounds) the digits and manifold M-steps ran 1.5-3x slower than 1 thread
whenever another job held a core, and passive waiting kept them at the 1-thread rate there. It
costs on an idle machine: every small operation then pays a thread wake-up, and a short spin
(``GOMP_SPINCOUNT=10000``) ran the same M-steps 1.5x faster than passive waiting when nothing
else ran, but up to 3x slower beside a busy job. On a machine of your own, set
``GOMP_SPINCOUNT=10000`` and diffem keeps it. Library use (``import diffem_cli``) leaves torch's
settings alone.
"""

from __future__ import annotations

import os

from diffem_cli.core.errors import DiffemError

THREADS_ENV = "DIFFEM_THREADS"
DEFAULT_THREADS = "all"
"""Every core this process may use (with passive OpenMP waiting, see the module docstring)."""


def openmp_wait_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The OpenMP waiting setting the command puts in the environment before torch loads:
    ``OMP_WAIT_POLICY=PASSIVE``, unless the user set ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``,
    whose choice is kept ({} then)."""
    environ = os.environ if environ is None else environ
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return {}
    return {"OMP_WAIT_POLICY": "PASSIVE"}


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
    """Set torch's intra-op threads from ``value``, else ``DIFFEM_THREADS``, else (unless
    ``OMP_NUM_THREADS`` is set, which torch already follows) :data:`DEFAULT_THREADS`; returns the
    count in effect."""
    import torch

    if value is not None:
        n = parse_threads(value)
    elif os.environ.get(THREADS_ENV, "").strip():
        n = parse_threads(os.environ[THREADS_ENV], THREADS_ENV)
    elif os.environ.get("OMP_NUM_THREADS", "").strip():
        return torch.get_num_threads()
    else:
        n = parse_threads(DEFAULT_THREADS)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
