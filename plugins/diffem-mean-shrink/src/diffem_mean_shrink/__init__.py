"""``mean-shrink``: a small example method plugin for diffem (a heuristic, not a published method).

Each lap trains an unconditional prior on ``w y + (1 - w) x``: the observations ``y`` averaged
with the previous lap's reconstructions ``x`` (``shrink.weight = w``). With ``w = 1`` it is the
``naive`` reference (a prior on the observations as if clean); with ``w = 0`` it is EM-MMPS
(without ``em.drop_outside``). Posterior samples are drawn by MMPS guidance (``mmps.*`` options,
shared with EM-MMPS). It needs a linear channel whose observations have the data's shape
(``mask``, ``box``, ``blur``, ``noise``).

There is no theory behind the average: it pulls the prior towards the observations, which are
biased (masked pixels are zeros, noise is kept), so expect it to sit between naive and EM-MMPS.
It is here to show what a method plugin looks like.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from diffem_cli.core.checks import bad, finite
from diffem_cli.core.errors import DiffemError
from diffem_cli.diffusion.denoise import NetworkDenoiser
from diffem_cli.methods.base import Method, MStep, Posterior, model_device
from diffem_cli.methods.em_mmps import MMPSOptions, linear_only, mmps_make, prior_mstep


@dataclass
class ShrinkOptions:
    """Section ``shrink``: the weight ``w`` of the observations in the training data."""

    weight: float = 0.5

    def validate(self) -> None:
        """One-line DiffemError for a bad value."""
        if not 0 <= finite("shrink.weight", self.weight) <= 1:
            raise bad("shrink.weight", self.weight, "in [0, 1]")


class MeanShrink(Method):
    name = "mean-shrink"
    description = "mean-shrink (plugin example): prior on observations averaged with reconstructions"
    kind = "unconditional"
    option_classes = {"shrink": ShrinkOptions, "mmps": MMPSOptions}

    def accepts(self, channel: Any) -> str | None:
        return linear_only(self.name, channel)

    def check(self, data: Any) -> None:
        y = data.obs.get("y")
        if y is None or tuple(y.shape[1:]) != data.shape:
            raise DiffemError(
                f"method 'mean-shrink' averages observations with reconstructions; channel "
                f"{data.channel.name!r} gives observations of another shape than the data"
            )
        super().check(data)

    def mstep(self, data, prev, lap, laps, clean, cfg) -> MStep:
        w = float(self.options["shrink"].weight)
        x = w * data.obs["y"].float() + (1 - w) * prev
        return prior_mstep(x, lap, cfg, self.options["mmps"])

    def posterior(self, model, data, aux) -> Posterior:
        prior = NetworkDenoiser(model)
        return Posterior(mmps_make(prior, data.channel, self.options["mmps"], aux, model_device(model)))
