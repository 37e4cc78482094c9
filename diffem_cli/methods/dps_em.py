"""DPS-EM (EMDiffusion, Bai et al. NeurIPS 2024): EM with an unconditional prior and DPS E-steps.

M-step: the prior fine-tuned on the previous lap's reconstructions; with ``dps.reset_last = N``
the last N laps retrain from fresh weights instead (the paper's phase 2). E-step: diffusion
posterior sampling (:class:`~diffem_cli.methods.guidance.DPSDenoiser`): a gradient step on the data
residual ``||y - F(x0)||`` through the denoiser at every sampler step, with likelihood weight
``dps.scale``. With ``dps.adaptive`` the weight is chosen afresh at every E-step, as in the
paper: each value of ``dps.grid`` samples the first ``dps.subset`` observations (same noise for
every value), and the one with the smallest mean residual ``||y - F(x)||`` samples them all; the
chosen value is recorded in the lap's record (``dps_scale``).

Works for every channel with a differentiable forward model: linear ones (``F = A``) and
``jpeg`` (kornia's differentiable codec), or any plugin that sets ``differentiable``. Lap 0 is
diffem's Gaussian start (linear channels), the observations themselves (others), or an
unconditional ``--warm-start`` checkpoint (e.g. ``train-uncond`` on a few clean images, the
paper's initialisation) sampled by DPS.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from diffem_cli.core.checks import bad, finite, int_at_least
from diffem_cli.diffusion.denoise import Denoiser, NetworkDenoiser
from diffem_cli.methods.base import Draw, Make, Method, MStep, Posterior, inside_box
from diffem_cli.methods.em_mmps import prior_mstep


@dataclass
class DPSOptions:
    """Diffusion posterior sampling (section ``dps``): likelihood step size and EMDiffusion's options.

    The default weight, 100, is what EMDiffusion's smallest-residual rule picked on masked
    digits (bench/results/findings.md)."""

    scale: float = 100.0
    adaptive: bool = False
    grid: list[float] = field(default_factory=lambda: [10.0, 30.0, 100.0, 300.0])
    subset: int = 256
    reset_last: int = 0

    def validate(self) -> None:
        """One-line DiffemError for a bad value."""
        if finite("dps.scale", self.scale) <= 0:
            raise bad("dps.scale", self.scale, "> 0")
        if not self.grid:
            raise bad("dps.grid", self.grid, "a non-empty list of positive numbers")
        for g in self.grid:
            if finite("dps.grid", g) <= 0:
                raise bad("dps.grid", self.grid, "a non-empty list of positive numbers")
        int_at_least("dps.subset", self.subset, 1)
        int_at_least("dps.reset_last", self.reset_last, 0)


def differentiable_only(method: str, channel: Any) -> str | None:
    """DPS needs a differentiable forward model: a linear channel, or one declaring it."""
    if getattr(channel, "linear", False) or getattr(channel, "differentiable", False):
        return None
    return (
        f"method {method!r} needs a channel with a differentiable forward model (linear ones, "
        f"jpeg); {channel.name!r} declares none"
    )


def mean_residual(channel: Any, obs: dict[str, torch.Tensor], x: torch.Tensor) -> float:
    """Mean over samples of ``||y - F(x)||_2``."""
    from diffem_cli.methods.guidance import residual_norm

    with torch.no_grad():
        return float(residual_norm(channel, obs, x.float()).mean())


def dps_posterior(model: nn.Module, data: Any, dps: DPSOptions) -> Posterior:
    """DPS posterior sampling with the prior ``model``: weight ``dps.scale``, or with
    ``dps.adaptive`` the grid value of smallest mean residual on the first ``dps.subset``
    observations (same noise for every value); the chosen weight is the E-step's record."""
    from diffem_cli.methods.guidance import DPSDenoiser

    prior = NetworkDenoiser(model)
    channel = data.channel

    def with_scale(scale: float) -> Make:
        def make(obs: dict[str, torch.Tensor]) -> Denoiser:
            return DPSDenoiser(prior, channel, obs, scale)

        return make

    if not dps.adaptive:
        scale = float(dps.scale)
        return Posterior(with_scale(scale), record={"dps_scale": scale})

    def choose(draw: Draw) -> tuple[Make, dict[str, Any]]:
        k = min(int(dps.subset), len(data))
        obs = {n: v[:k] for n, v in data.obs.items()}
        residuals = {}
        for value in dps.grid:
            x = draw(with_scale(float(value)), k, f"weight {value:g}")
            residuals[float(value)] = mean_residual(channel, obs, x)
        scale = min(residuals, key=lambda v: (residuals[v], v))
        record = {"dps_scale": scale, "dps_residuals": [[v, r] for v, r in residuals.items()]}
        return with_scale(scale), record

    return Posterior(choose=choose)


class DPSEM(Method):
    name = "dps-em"
    description = "DPS-EM (EMDiffusion): unconditional prior, E-step by diffusion posterior sampling"
    order = 50
    option_classes = {"dps": DPSOptions}

    def accepts(self, channel: Any) -> str | None:  # noqa: D102
        return differentiable_only(self.name, channel)

    def mstep(self, data, prev, lap, laps, clean, cfg) -> MStep:  # noqa: D102
        step = prior_mstep(inside_box(prev, cfg.em.drop_outside), lap, cfg, None)
        step.fine_tune = lap <= laps - self.options["dps"].reset_last
        return step

    def posterior(self, model, data, aux) -> Posterior:  # noqa: D102
        return dps_posterior(model, data, self.options["dps"])
