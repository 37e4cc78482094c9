"""A roofline for one network on this machine: what its own matrix products and convolutions cost.

:func:`dense_ops` records every matrix product and convolution (forward and backward) that one
call of a function runs, with the shapes, strides and dtypes of its operands; :func:`dense_limit`
replays each of them alone on fresh tensors of the same layout and device, timed (waiting for
the device before reading the clock), and counts its FLOPs with
``torch.utils.flop_counter``. The limit is then the rate at which this machine runs exactly that
network's dense work, with nothing else: FLOPs over the summed replay times. A training step or an
E-step that reaches it spends no time outside its matrix products and convolutions (activations,
normalisations, optimiser, sampler, data handling); the fraction of it achieved says how much room
fusing or removing that other work could leave.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten
DENSE = {
    aten.mm.default,
    aten.addmm.default,
    aten.bmm.default,
    aten.baddbmm.default,
    aten.convolution.default,
    aten.convolution_backward.default,
}


@dataclass(frozen=True)
class Spec:
    """A tensor's layout, without its values."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    device: str = "cpu"

    def make(self, gen: torch.Generator) -> torch.Tensor:
        """A tensor of this layout filled with unit normals (drawn on the CPU, then moved)."""
        t = torch.empty_strided(self.shape, self.stride, dtype=self.dtype)
        t = t.normal_(generator=gen) if t.is_floating_point() else t.zero_()
        return t.to(self.device) if self.device != "cpu" else t


def _spec(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return Spec(tuple(x.shape), tuple(x.stride()), x.dtype, str(x.device))
    if isinstance(x, list | tuple):
        return type(x)(_spec(v) for v in x)
    return x


def _build(x: Any, gen: torch.Generator) -> Any:
    if isinstance(x, Spec):
        return x.make(gen)
    if isinstance(x, list | tuple):
        return type(x)(_build(v, gen) for v in x)
    return x


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[Any, Any, Any]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        if func in DENSE:
            self.ops.append((func, _spec(args), _spec(kwargs)))
        return func(*args, **kwargs)


def dense_ops(fn: Callable[[], Any]) -> list[tuple[Any, Any, Any]]:
    """The matrix products and convolutions ``fn()`` runs (autograd's backward ones included when
    ``fn`` calls ``backward``), as ``(op, args, kwargs)`` with tensors replaced by their layout."""
    rec = _Recorder()
    with rec:
        fn()
    return rec.ops


def flops_of(fn: Callable[[], Any]) -> int:
    """FLOPs of ``fn()`` by ``torch.utils.flop_counter`` (matrix products and convolutions, the
    multiply and the add counted apart)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def _synchronizer(args: Any) -> Callable[[], None]:
    """A function that waits for the device of the first CUDA tensor in ``args`` (a no-op on CPU),
    so that host clocks time work that has finished, not work that was queued."""
    for x in args if isinstance(args, list | tuple) else (args,):
        if isinstance(x, torch.Tensor) and x.device.type == "cuda":
            return lambda dev=x.device: torch.cuda.synchronize(dev)
        if isinstance(x, list | tuple):
            inner = _synchronizer(x)
            if inner is not _no_sync:
                return inner
    return _no_sync


def _no_sync() -> None:
    return None


def dense_limit(
    ops: list[tuple[Any, Any, Any]], repeats: int = 5, min_seconds: float = 0.05
) -> dict[str, float]:
    """Replay every op of ``ops`` alone (distinct layouts timed once, counted as often as they
    occur): ``flops`` in total, ``seconds`` summed, and ``rate`` = flops / seconds (FLOP/s).

    Each distinct op is run ``repeats`` times after a warm-up (more while it has not filled
    ``min_seconds``) and its best time per call kept: the limit is what the machine can do, so
    interference from other jobs should not lower it."""
    gen = torch.Generator().manual_seed(0)
    counts: dict[str, list[Any]] = {}
    for func, args, kwargs in ops:
        key = repr((func, args, kwargs))
        if key in counts:
            counts[key][0] += 1
        else:
            counts[key] = [1, func, args, kwargs]
    flops = seconds = 0.0
    for count, func, args, kwargs in counts.values():
        a, k = _build(args, gen), _build(kwargs, gen)
        sync = _synchronizer(a)
        chunk = 1 if sync is _no_sync else 20  # a device queues calls: time a run of them, then wait
        with torch.no_grad():
            op_flops = flops_of(lambda func=func, a=a, k=k: func(*a, **k))
            func(*a, **k)
            best = float("inf")
            for _ in range(repeats):
                sync()
                n, t0 = 0, time.perf_counter()
                while True:
                    for _call in range(chunk):
                        func(*a, **k)
                    n += chunk
                    sync()
                    elapsed = time.perf_counter() - t0
                    if elapsed >= min_seconds / repeats or n >= 1000:
                        break
                best = min(best, elapsed / n)
        flops += count * op_flops
        seconds += count * best
    return {"flops": flops, "seconds": seconds, "rate": flops / seconds if seconds else float("nan")}
