"""Posterior guidance: denoisers that wrap a prior denoiser to estimate ``E[x | x_t, y]``.

:class:`MMPSDenoiser` is moment-matching posterior sampling (Rozet et al. 2024) for a channel
with a linear form ``y = A x + s eps``: with the prior's Tweedie mean ``x0 = E[x | x_t]`` and
Tweedie covariance ``Cov[x | x_t] = (sigma_t^2 / alpha_t) d x0 / d x_t`` (applied through
vector-Jacobian products), it returns

    x0 + Cov A^T (s^2 I + A Cov A^T)^-1 (y - A x0),

the linear system solved by a fixed number of conjugate-gradient iterations per step (each one
vector-Jacobian product). With a Gaussian covariance heuristic (``covariance``, a
:class:`~diffem_cli.gaussian.moments.GaussianCovariance`, the official EM-MMPS manifold recipe), ``Cov``
inside the solve is the Gaussian posterior covariance at the step's noise level instead: the
solve costs no network work, and the step one forward pass and one vector-Jacobian product.
A learnt network's Jacobian need not be positive semi-definite: a CG direction of curvature
below the noise variance (what a valid covariance guarantees) ends that sample's solve
rather than taking a step that would throw the sample far off.

``alpha_t`` is floored at ``ALPHA_MIN`` (a VE noise level of at most 100, the official code's
largest), so the first, nearly pure-noise steps do not amplify the network's Jacobian error by
``1 / alpha_t``.

:class:`DPSDenoiser` is diffusion posterior sampling (Chung et al. 2023, as EMDiffusion uses it)
in score form for any channel with a differentiable forward model ``F`` (``Channel.forward``):

    x0 - zeta * (sigma_t^2 / max(alpha_t, ALPHA_MIN)) * grad_{x_t} ||y - F(x0(x_t))||_2,

the per-sample (non-squared) residual norm differentiated through the prior denoiser. Since
``x0 = (x_t + sigma_t^2 score) / alpha_t``, this adds ``-zeta grad ||y - F(x0)||`` to the score:
a likelihood term with a fixed weight ``zeta`` at every noise level, whatever the sampler.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from diffem_channels import Channel
from diffem_cli.diffusion.denoise import Denoiser, alpha_sigma
from diffem_cli.gaussian.linalg import conjugate_gradient
from diffem_cli.gaussian.moments import GaussianCovariance

ALPHA_MIN = 0.01
# The smallest curvature accepted in the MMPS system for noise-free channels: the official code's
# observation noise for masked CIFAR-10, (1e-3)^2.
MIN_NOISE_VAR = 1e-6


class MMPSDenoiser(Denoiser):
    """MMPS posterior denoiser for the observations ``obs`` (one per row of the batch)."""

    needs_grad = True

    def __init__(
        self,
        prior: Denoiser,
        channel: Channel,
        obs: Mapping[str, torch.Tensor],
        cg_iters: int = 1,
        covariance: GaussianCovariance | None = None,
    ):
        self.prior = prior
        self.channel = channel
        self.obs = dict(obs)
        self.cg_iters = int(cg_iters)
        self.covariance = covariance
        self.noise_var = float(channel.noise_std(self.obs)) ** 2

    def __call__(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        a, s = alpha_sigma(t)
        scale = s * s / max(a, ALPHA_MIN)
        x_t = x_t.detach().requires_grad_(True)
        x0 = self.prior(x_t, t)
        residual = self.obs["y"] - self.channel.A(self.obs, x0.detach())

        def cov_at(u: torch.Tensor) -> torch.Tensor:
            w = self.channel.At(self.obs, u)
            (g,) = torch.autograd.grad(x0, x_t, w, retain_graph=True)
            return scale * g

        inner = cov_at
        if self.covariance is not None:
            var = (s / max(a, ALPHA_MIN)) ** 2

            def inner(u: torch.Tensor) -> torch.Tensor:
                return self.covariance(self.channel.At(self.obs, u), var)

        def op(u: torch.Tensor) -> torch.Tensor:
            return self.noise_var * u + self.channel.A(self.obs, inner(u))

        # for a positive semi-definite covariance, op's curvature is at least the noise variance
        u = conjugate_gradient(op, residual, self.cg_iters, min_curvature=max(self.noise_var, MIN_NOISE_VAR))
        return (x0 + cov_at(u)).detach()


def residual_norm(channel: Channel, obs: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Per-sample data residual ``||y - F(x)||_2`` (shape ``(B,)``), differentiable in ``x``."""
    r = obs["y"].to(x) - channel.forward(obs, x)
    # the floor keeps the gradient finite at an exact fit (where the norm is not differentiable)
    return r.flatten(1).pow(2).sum(1).clamp_min(1e-12).sqrt()


class DPSDenoiser(Denoiser):
    """DPS posterior denoiser for the observations ``obs`` with likelihood weight ``scale``
    (``zeta`` in the module docstring). One network evaluation and one vector-Jacobian product
    per step."""

    needs_grad = True

    def __init__(self, prior: Denoiser, channel: Channel, obs: Mapping[str, torch.Tensor], scale: float):
        self.prior = prior
        self.channel = channel
        self.obs = dict(obs)
        self.scale = float(scale)

    def __call__(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        a, s = alpha_sigma(t)
        x_t = x_t.detach().requires_grad_(True)
        x0 = self.prior(x_t, t)
        (g,) = torch.autograd.grad(residual_norm(self.channel, self.obs, x0).sum(), x_t)
        return (x0 - (self.scale * s * s / max(a, ALPHA_MIN)) * g).detach()
