"""Compute accounting: network passes counted where they happen, not derived from settings.

A method's E-step cost is not its sampler's step count: DPS adds a vector-Jacobian product
(VJP) through the network per step, MMPS one per conjugate-gradient iteration, an adaptive
guidance weight adds trial draws. :class:`CountingNetwork` wraps the network the sampler calls
and counts, in samples (rows), every forward pass and every VJP taken through one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from diffem_cli.core.runtime import Context, all_mean


class CountingNetwork(nn.Module):
    """``net`` counting its forward passes and the VJPs through them, in rows: a batch of 8 counts
    8 forwards, and each gradient taken through that call's output 8 VJPs."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.forwards = 0
        self.vjps = 0

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:  # noqa: D102
        out = self.net(x, *args, **kwargs)
        rows = len(x)
        self.forwards += rows
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(self._on_vjp(rows))
        return out

    def _on_vjp(self, rows: int) -> Callable[[torch.Tensor], None]:
        def hook(_grad: torch.Tensor) -> None:
            self.vjps += rows

        return hook

    def totals(self, ctx: Context | None = None) -> dict[str, int]:
        """``forwards`` and ``vjps`` over every process (each samples its share of the rows)."""
        world = ctx.world if ctx is not None else 1
        device = ctx.device if ctx is not None else torch.device("cpu")

        def total(n: int) -> int:
            return round(float(all_mean(torch.tensor(float(n), device=device), ctx)) * world)

        return {"forwards": total(self.forwards), "vjps": total(self.vjps)}
