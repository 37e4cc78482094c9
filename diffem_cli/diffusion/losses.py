"""Training objectives: a loss object takes the network and a batch dict, returns a scalar.

The one training loop (:func:`diffem_cli.diffusion.train.train_denoiser`) draws batches of rows from a
dict of aligned tensors and hands each batch to a loss. :class:`VLoss` is denoising score
matching in v-prediction (DiffEM, EM-MMPS, DPS-EM, naive, oracle, train-uncond); methods with
another objective (Ambient-Diffusion's loss on the observed pixels) bring their own.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from diffem_cli.core.errors import DiffemError

T_SAMPLING = ("uniform", "log-sigma")


class Loss(Protocol):
    """``loss(model, batch, scheduler, generator) -> scalar``; ``batch`` maps names to rows."""

    def __call__(
        self, model: nn.Module, batch: dict[str, torch.Tensor], scheduler: Any, generator: torch.Generator
    ) -> torch.Tensor: ...


def draw_timesteps(
    n: int,
    scheduler: Any,
    t_sampling: str,
    generator: torch.Generator | None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Training timesteps: ``uniform`` over the 1,000 steps, or ``log-sigma``: half uniform, half
    with noise levels sigma = sqrt((1 - abar) / abar) log-uniform between the schedule's smallest
    and 10, which spends more of the budget at low noise, where fine structure (thin manifolds,
    sharp posteriors) is learnt, while every step keeps being trained."""
    steps = scheduler.config.num_train_timesteps
    if t_sampling not in T_SAMPLING:
        raise DiffemError(f"unknown train.t_sampling {t_sampling!r} (choose from {', '.join(T_SAMPLING)})")
    device = device if device is not None else (generator.device if generator is not None else None)
    t = torch.randint(0, steps, (n,), generator=generator, device=device)
    if t_sampling == "uniform":
        return t
    abar = scheduler.alphas_cumprod.double().to(t.device)
    log_sigma = 0.5 * torch.log((1 - abar) / abar)
    lo, hi = float(log_sigma[0]), math.log(10.0)
    target = lo + torch.rand(n, generator=generator, dtype=torch.float64, device=t.device) * (hi - lo)
    pick = torch.rand(n, generator=generator, device=t.device) < 0.5
    return torch.where(pick, torch.searchsorted(log_sigma, target).clamp(0, steps - 1), t)


def noised(
    x0: torch.Tensor, scheduler: Any, generator: torch.Generator, t_sampling: str = "uniform"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_t, t, noise)`` for clean rows ``x0`` at training timesteps, drawn on ``x0``'s device."""
    t = draw_timesteps(x0.shape[0], scheduler, t_sampling, generator, x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    return scheduler.add_noise(x0, noise, t), t, noise


class VLoss:
    """Mean squared error on ``v`` for ``batch["x"]``, conditioned on ``batch["cond"]`` if present;
    with ``batch["weight"]`` (shaped like ``x``) the weighted mean, e.g. over the entries a model
    does not take from its observation. ``around`` wraps the model for the loss, e.g. as a residual
    (:class:`~diffem_cli.diffusion.residual.GaussianResidual`); the trained weights stay the model's."""

    def __init__(self, t_sampling: str = "uniform", around: Callable[[nn.Module], nn.Module] | None = None):
        self.t_sampling = t_sampling
        self.around = around

    def __call__(
        self, model: nn.Module, batch: dict[str, torch.Tensor], scheduler: Any, generator: torch.Generator
    ) -> torch.Tensor:
        x0 = batch["x"]
        x_t, t, noise = noised(x0, scheduler, generator, self.t_sampling)
        target = scheduler.get_velocity(x0, noise, t)
        net = self.around(model) if self.around is not None else model
        pred = net(x_t, t, batch.get("cond"))
        err = (pred.float() - target.float()) ** 2
        weight = batch.get("weight")
        if weight is None:
            return torch.mean(err)
        weight = weight.float()
        return (err * weight).sum() / weight.sum().clamp_min(1.0)
