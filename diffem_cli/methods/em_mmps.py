"""EM-MMPS (Rozet et al. 2024): EM with an unconditional prior and MMPS posterior sampling.

M-step: the prior fine-tuned on the previous lap's reconstructions (optimiser and EMA restart
each lap). E-step: moment-matching posterior sampling (Tweedie mean and covariance, a few
conjugate-gradient iterations, ``mmps.cg_iters``) through the channel's linear form.

With ``mmps.covariance: gaussian`` each M-step also fits Gaussian moments to its training data
(:func:`~diffem_cli.gaussian.moments.fit_moments`), kept in the checkpoint as auxiliary tensors
``moments.*`` and used as MMPS's covariance by the E-step and ``reconstruct``; a checkpoint
without them (``train-uncond``) falls back to the Tweedie covariance. The helpers here
(:func:`prior_mstep`, :func:`mmps_make`) serve every prior method sampled by MMPS.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from diffem_cli.config.run import RunConfig
from diffem_cli.core.checks import choice, int_at_least
from diffem_cli.diffusion.denoise import Denoiser, NetworkDenoiser
from diffem_cli.diffusion.losses import Loss, VLoss
from diffem_cli.methods.base import Make, Method, MStep, Posterior, inside_box, lap_seed, model_device

if TYPE_CHECKING:
    from diffem_cli.gaussian.prior import GaussianPrior

COVARIANCES: tuple[str, ...] = ("tweedie", "gaussian")


@dataclass
class MMPSOptions:
    """Moment-matching posterior sampling (section ``mmps``): conjugate-gradient iterations per
    step, and the covariance inside the solve: ``tweedie`` (the network's Jacobian, one
    vector-Jacobian product per iteration) or ``gaussian`` (a Gaussian fitted to the prior's
    training data: no network work in the solve; the official EM-MMPS manifold recipe)."""

    cg_iters: int = 1
    covariance: str = "tweedie"

    def validate(self) -> None:
        """One-line DiffemError for a bad value."""
        int_at_least("mmps.cg_iters", self.cg_iters, 1)
        choice("mmps.covariance", self.covariance, COVARIANCES)


def linear_only(method: str, channel: Any) -> str | None:
    """MMPS needs the channel's linear form ``A``, ``A^T`` and noise level."""
    if getattr(channel, "linear", False):
        return None
    return (
        f"method {method!r} samples posteriors by MMPS, which needs a linear channel; "
        f"{channel.name!r} has no linear form (use --method dps-em or diffem)"
    )


def prior_mstep(
    x: torch.Tensor, lap: int, cfg: RunConfig, mmps: MMPSOptions | None, loss: Loss | None = None
) -> MStep:
    """A prior's M-step on ``{"x": x}``; with ``mmps`` asking for the Gaussian covariance, the
    moments of ``x`` as auxiliary tensors ``moments.*``."""
    aux: dict[str, torch.Tensor] = {}
    if mmps is not None and mmps.covariance == "gaussian":
        from diffem_cli.gaussian.moments import fit_moments

        moments = fit_moments(x, cfg.em.gaussian_rank, seed=lap_seed(cfg.seed, lap, "moments"))
        aux = {f"moments.{k}": v for k, v in moments.to_tensors().items()}
    return MStep({"x": x}, loss or VLoss(cfg.train.t_sampling), aux=aux)


def moments_from_aux(aux: Mapping[str, torch.Tensor]) -> GaussianPrior | None:
    """The Gaussian moments a checkpoint's auxiliary tensors ``moments.*`` hold, or None."""
    from diffem_cli.gaussian.prior import GaussianPrior

    found = {k[len("moments.") :]: v for k, v in aux.items() if k.startswith("moments.")}
    return GaussianPrior.from_tensors(found) if found else None


def mmps_make(
    prior: Denoiser, channel: Any, mmps: MMPSOptions, aux: Mapping[str, torch.Tensor], device: torch.device
) -> Make:
    """``obs -> MMPS denoiser`` with the prior denoiser ``prior``; the checkpoint's moments
    (``aux``) as the covariance when ``mmps.covariance`` is ``gaussian`` and they exist."""
    from diffem_cli.methods.guidance import MMPSDenoiser

    cov = None
    moments = moments_from_aux(aux) if mmps.covariance == "gaussian" else None
    if moments is not None:
        from diffem_cli.gaussian.moments import GaussianCovariance

        cov = GaussianCovariance(moments.to(device))
    iters = mmps.cg_iters

    def make(obs: dict[str, torch.Tensor]) -> Denoiser:
        return MMPSDenoiser(prior, channel, obs, iters, covariance=cov)

    return make


def mmps_passes(opts: MMPSOptions) -> float:
    """Network passes per MMPS step: the forward pass, one vector-Jacobian product per CG
    iteration with the Tweedie covariance (none with the Gaussian one), and the final covariance
    product."""
    return 2.0 if opts.covariance == "gaussian" else 2.0 + opts.cg_iters


class EMMMPS(Method):
    name = "em-mmps"
    description = "EM-MMPS: unconditional prior, E-step by moment-matching posterior sampling"
    order = 20
    compared_by_default = True
    option_classes = {"mmps": MMPSOptions}

    def accepts(self, channel: Any) -> str | None:  # noqa: D102
        return linear_only(self.name, channel)

    def mstep(self, data, prev, lap, laps, clean, cfg):  # noqa: D102
        return prior_mstep(inside_box(prev, cfg.em.drop_outside), lap, cfg, self.options["mmps"])

    def passes_per_step(self, channel: Any) -> float:  # noqa: D102
        return mmps_passes(self.options["mmps"])

    def posterior(self, model: nn.Module, data, aux) -> Posterior:  # noqa: D102
        make = mmps_make(NetworkDenoiser(model), data.channel, self.options["mmps"], aux, model_device(model))
        return Posterior(make)
