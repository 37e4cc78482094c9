"""Ambient-Tweedie (ambient-laws, Daras et al.): the exact, EM-free prior for Gaussian noise.

For the channels that declare ``gaussian_denoising`` (``noise``, or a plugin's),
``y = x + sigma_n eps`` with ``sigma_n`` known (the channel's ``noise_std``). In diffem's VP
schedule ``x_t = alpha_t x + sigma_t z`` the VE noise level is ``s_t = sigma_t / alpha_t``; at
levels ``s_t > sigma_n`` a noisy sample can be built from the observation alone:

    x_t = alpha_t y + sqrt(sigma_t^2 - alpha_t^2 sigma_n^2) eps'

(variance ``alpha_t^2 sigma_n^2 + sigma_t^2 - alpha_t^2 sigma_n^2 = sigma_t^2``, as for a clean
``x``). Along the Gaussian chain ``x -> y -> x_t / alpha_t``, ``E[y | x, x_t] = x + c (x_t/alpha_t
- x)`` with ``c = sigma_n^2 / s_t^2 = sigma_n^2 alpha_t^2 / sigma_t^2``, so the network's clean
estimate ``x0_hat`` is mapped to a prediction of the noisy observation

    y_hat = (1 - c) x0_hat + c x_t / alpha_t,

scored by ``||y_hat - y||^2 / sigma_t^2`` (the weight of diffem's v-loss on x0 errors). Its
minimiser is ``y_hat = E[y | x_t]``, i.e. ``x0_hat = E[x | x_t]``: exact, no EM. Training only
uses timesteps ``t >= t_min``, the first with ``s_t > sigma_n`` (the training distribution of
``t`` is squeezed onto ``[t_min, 1000)``).

Sampling is the plain sampler (``diffem sample``) and MMPS for posteriors (a prior, like naive);
the checkpoint records ``sigma_n`` (``ambient_tweedie.noise_std``) for the sampler.
Below ``t_min`` the network was never trained: there it is evaluated at ``t_min`` on the input
rescaled to ``alpha_{t_min} x_t / alpha_t`` (the VE input ``x_t / alpha_t`` read as if at noise
level ``sigma_n``), a slight over-smoothing of the last steps instead of an extrapolation.
"""

from __future__ import annotations

from typing import Any

import torch

from diffem_cli.core.errors import DiffemError
from diffem_cli.diffusion.denoise import Denoiser, NetworkDenoiser, alpha_sigma, x0_from_v
from diffem_cli.diffusion.losses import draw_timesteps
from diffem_cli.methods.base import Method, MStep, Posterior, Prior, model_device
from diffem_cli.methods.denoisers import denoising_only, denoising_sigma
from diffem_cli.methods.em_mmps import MMPSOptions, mmps_make, mmps_passes


def first_timestep_above(sigma_n: float, scheduler: Any | None = None) -> int:
    """The first timestep whose VE noise level ``sigma_t / alpha_t`` exceeds ``sigma_n``."""
    if scheduler is None:
        from diffem_cli.diffusion.schedule import ddpm_scheduler

        scheduler = ddpm_scheduler()
    abar = scheduler.alphas_cumprod.double()
    ve = ((1 - abar) / abar).sqrt()
    above = torch.nonzero(ve > sigma_n).flatten()
    if len(above) == 0:
        raise DiffemError(f"noise level {sigma_n:g} is above every diffusion noise level of the schedule")
    return int(above[0])


def y_prediction(x0: torch.Tensor, x_t: torch.Tensor, a, s, sigma_n: float) -> torch.Tensor:
    """``E[y | x_t]`` from ``E[x | x_t] = x0`` at a VP level ``(a, s)`` above ``sigma_n``."""
    c = (sigma_n * a / s) ** 2
    return (1 - c) * x0 + c * x_t / a


class TweedieLoss:
    """Ambient-Tweedie's loss on the noisy observations ``batch["y"]``."""

    def __init__(self, sigma_n: float, t_sampling: str = "uniform"):
        self.sigma_n = float(sigma_n)
        self.t_sampling = t_sampling

    def __call__(self, model, batch, scheduler, generator):  # noqa: D102
        y = batch["y"]
        steps = scheduler.config.num_train_timesteps
        t_min = first_timestep_above(self.sigma_n, scheduler)
        t = draw_timesteps(len(y), scheduler, self.t_sampling, generator, y.device)
        t = t_min + (t * (steps - t_min)) // steps
        abar = scheduler.alphas_cumprod.to(y.device)[t].float().view(-1, *([1] * (y.dim() - 1)))
        a, s = abar.sqrt(), (1 - abar).sqrt()
        extra = (s * s - (a * self.sigma_n) ** 2).clamp_min(0).sqrt()
        x_t = a * y + extra * torch.randn(y.shape, generator=generator, device=y.device)
        x0 = x0_from_v(x_t, model(x_t, t, None).float(), a, s)
        err = (y_prediction(x0, x_t, a, s, self.sigma_n) - y) ** 2 / (s * s)
        return err.mean()


class FlooredDenoiser(Denoiser):
    """A denoiser evaluated at ``max(t, t_min)``: below ``t_min`` at ``t_min`` on the rescaled
    input ``alpha_{t_min} x_t / alpha_t``."""

    def __init__(self, inner: Denoiser, t_min: int):
        self.inner, self.t_min = inner, int(t_min)

    def __call__(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        if int(t) >= self.t_min:
            return self.inner(x_t, t)
        a, _ = alpha_sigma(t)
        a_min, _ = alpha_sigma(self.t_min)
        return self.inner(x_t * (a_min / a), self.t_min)


def floored_prior(model: Any, sigma_n: float) -> Denoiser:
    """The trained network as a denoiser at every timestep (floored at ``t_min``)."""
    return FlooredDenoiser(NetworkDenoiser(model), first_timestep_above(sigma_n))


class AmbientTweedie(Method):
    name = "ambient-tweedie"
    description = "Ambient-Tweedie: a prior from noisy data trained only above its noise level, no EM"
    order = 70
    option_classes = {"mmps": MMPSOptions}

    def accepts(self, channel: Any) -> str | None:  # noqa: D102
        return denoising_only(self.name, channel)

    def mstep(self, data, prev, lap, laps, clean, cfg) -> MStep:  # noqa: D102
        return MStep({"y": data.obs["y"].float()}, TweedieLoss(denoising_sigma(data), cfg.train.t_sampling))

    def passes_per_step(self, channel: Any) -> float:  # noqa: D102
        return mmps_passes(self.options["mmps"])

    def posterior(self, model, data, aux) -> Posterior:  # noqa: D102
        prior = floored_prior(model, denoising_sigma(data))
        return Posterior(mmps_make(prior, data.channel, self.options["mmps"], aux, model_device(model)))

    def checkpoint_meta(self, data) -> dict[str, Any]:
        """The noise level ``sigma_n`` the prior was trained above (what ``diffem sample`` floors at)."""
        return {"ambient_tweedie": {"noise_std": denoising_sigma(data)}}

    def prior(self, model, meta, seed) -> Prior:  # noqa: D102
        recorded = (meta.get("ambient_tweedie") or {}).get("noise_std")
        if recorded is None:  # written before the record: the 'noise' channel, its sigma
            recorded = ((meta.get("channel") or {}).get("params") or {})["sigma"]
        denoiser = floored_prior(model, float(recorded))
        return Prior(lambda _start, _stop: denoiser)
