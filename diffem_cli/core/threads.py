"""Torch's CPU threads for a ``diffem`` command.

``diffem --threads N COMMAND ...`` or ``DIFFEM_THREADS=N`` sets the count; without either, the
console command uses every core this process may use (:data:`DEFAULT_THREADS`). Before torch
loads, the command also bounds how long an OpenMP thread spins at a barrier before it sleeps
(:func:`openmp_wait_env`: ``GOMP_SPINCOUNT=10000``, unless ``OMP_WAIT_POLICY`` or
``GOMP_SPINCOUNT`` is set). ``bench/bench_speed.py``'s thread study on a shared 2-core machine
chose it: libgomp's default spin (300,000 rounds) ran the digits M-step 3-7x slower than 1 thread
whenever another job held a core; sleeping at once (``OMP_WAIT_POLICY=PASSIVE``) fixed that but
paid a thread wake-up on every small operation, so the manifold MLP's step was no faster on 2
threads than on 1; a short spin keeps the 2-thread gain on an idle machine and stays within about
15% of passive waiting beside a busy job. Library use (``import diffem_cli``) leaves torch's
settings alone.
"""

from __future__ import annotations

import os

from diffem_cli.core.errors import DiffemError

THREADS_ENV = "DIFFEM_THREADS"
SPIN_COUNT = "10000"
"""libgomp's spin rounds at a barrier before a waiting thread sleeps (its default is 300,000)."""
DEFAULT_THREADS = "all"
"""Every core this process may use (with passive OpenMP waiting, see the module docstring)."""


def openmp_wait_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The OpenMP waiting setting the command puts in the environment before torch loads:
    ``GOMP_SPINCOUNT`` (:data:`SPIN_COUNT`), unless the user set ``OMP_WAIT_POLICY`` or
    ``GOMP_SPINCOUNT``, whose choice is kept ({} then)."""
    environ = os.environ if environ is None else environ
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return {}
    return {"GOMP_SPINCOUNT": SPIN_COUNT}


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
