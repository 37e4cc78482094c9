"""A roofline for one network on this machine: what its own matrix products and convolutions cost.

:func:`dense_ops` records every matrix product and convolution (forward and backward) that one
call of a function runs, with the shapes, strides and dtypes of its operands; :func:`dense_limit`
replays each of them alone on fresh tensors of the same layout, timed, and counts its FLOPs with
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

    def make(self, gen: torch.Generator) -> torch.Tensor:
        """A tensor of this layout filled with unit normals."""
        t = torch.empty_strided(self.shape, self.stride, dtype=self.dtype)
        return t.normal_(generator=gen) if t.is_floating_point() else t.zero_()


def _spec(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return Spec(tuple(x.shape), tuple(x.stride()), x.dtype)
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
        with torch.no_grad():
            op_flops = flops_of(lambda func=func, a=a, k=k: func(*a, **k))
            func(*a, **k)
            best = float("inf")
            for _ in range(repeats):
                n, t0 = 0, time.perf_counter()
                while True:
                    func(*a, **k)
                    n += 1
                    elapsed = time.perf_counter() - t0
                    if elapsed >= min_seconds / repeats or n >= 1000:
                        break
                best = min(best, elapsed / n)
        flops += count * op_flops
        seconds += count * best
    return {"flops": flops, "seconds": seconds, "rate": flops / seconds if seconds else float("nan")}
