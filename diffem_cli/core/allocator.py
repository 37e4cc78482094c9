"""Keep freed memory in the process: glibc's ``malloc`` thresholds for a ``diffem`` command.

glibc serves every block above its mmap threshold (128 KiB at first, adapting up to 32 MiB) with a
fresh ``mmap`` and gives it back on ``free``, and trims the heap top beyond 128 KiB. A training step
or a sampler step allocates and frees tens of megabytes of activations every call, so the kernel
maps and zeroes those pages again each time: on a virtual machine a page fault is dear, and
activations such as SiLU and LayerNorm then spent most of their time faulting
(``bench/results/speed.md``). Raising both thresholds to 1 GiB lets freed blocks be reused from the
heap; results are unchanged (the allocator decides where tensors live, never their values).

The console command calls :func:`keep_freed_memory` before torch loads; library use leaves the
allocator alone. A ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` in the environment
(the user's own tuning) or a C library other than glibc leaves it alone too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters in glibc's malloc.h
THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds to 1 GiB; True when both were set."""
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, THRESHOLD))
