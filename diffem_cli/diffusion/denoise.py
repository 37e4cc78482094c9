"""Denoisers: what every sampler and every guidance talks to.

A denoiser maps a noisy sample ``x_t`` at timestep ``t`` of diffem's VP schedule
(``x_t = alpha_t x + sigma_t z``) to an estimate of the clean ``x`` (the Tweedie mean).
:class:`NetworkDenoiser` wraps a trained network (which predicts ``v``); a posterior guidance
(MMPS, DPS, see :mod:`diffem_cli.methods.guidance`) is a denoiser wrapping a denoiser, so every sampler
works with every guidance and with none.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

from diffem_cli.core.runtime import autocast
from diffem_cli.diffusion.schedule import SCHEDULE


@lru_cache(maxsize=1)
def alphas_cumprod() -> torch.Tensor:
    """The schedule's cumulative products ``abar_t`` (float64, 1,000 steps), computed once."""
    from diffem_cli.diffusion.schedule import ddpm_scheduler

    return ddpm_scheduler().alphas_cumprod.double()


def alpha_sigma(t: int) -> tuple[float, float]:
    """``(alpha_t, sigma_t)`` of the schedule at integer timestep ``t`` in [0, 1000)."""
    abar = float(alphas_cumprod()[int(t)])
    return abar**0.5, (1.0 - abar) ** 0.5


def x0_from_v(
    x_t: torch.Tensor, v: torch.Tensor, a: float | torch.Tensor, s: float | torch.Tensor
) -> torch.Tensor:
    """The clean estimate of a v-prediction: ``x0 = alpha_t x_t - sigma_t v``, with ``a = alpha_t``
    and ``s = sigma_t`` (numbers, or tensors broadcasting against ``x_t``)."""
    return a * x_t - s * v


class Denoiser:
    """Base class: ``denoiser(x_t, t) -> x0`` estimate. ``needs_grad`` asks the sampling loop to
    run with autograd enabled (guidances that differentiate through the network)."""

    needs_grad: bool = False

    def __call__(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        raise NotImplementedError

    def v(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        """The ``v`` target matching this denoiser's x0 estimate: ``v = (alpha x_t - x0) / sigma``."""
        a, s = alpha_sigma(t)
        return (a * x_t - self(x_t, t)) / s


class NetworkDenoiser(Denoiser):
    """A v-prediction network (``net(x_t, t, cond) -> v``) as a denoiser, with an optional
    conditioning tensor for the whole batch: ``x0 = alpha_t x_t - sigma_t v``."""

    def __init__(self, net: nn.Module, cond: torch.Tensor | None = None):
        self.net = net
        self.cond = cond
        self.device = next(net.parameters()).device

    def v(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        tt = torch.full((1,), int(t), device=x_t.device, dtype=torch.long)
        with autocast(x_t.device):
            return self.net(x_t, tt, self.cond).float()

    def __call__(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        a, s = alpha_sigma(t)
        return x0_from_v(x_t, self.v(x_t, t), a, s)


__all__ = ["SCHEDULE", "Denoiser", "NetworkDenoiser", "alpha_sigma", "alphas_cumprod", "x0_from_v"]


class KeepObserved(Denoiser):
    """``x0 = y`` on the entries a noiseless channel gives exactly, ``inner``'s estimate elsewhere:
    ``D(x_t, y) = M y + (1 - M) D_inner(x_t, y)``, the true posterior's data consistency."""

    def __init__(self, inner: Denoiser, exact: torch.Tensor, y: torch.Tensor):
        self.inner, self.exact, self.y = inner, exact > 0, y
        self.needs_grad = inner.needs_grad  # guidance inside (MMPS, DPS) differentiates the network

    def __call__(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        x0 = self.inner(x_t, t)
        return torch.where(self.exact, self.y.to(x0.dtype), x0)
