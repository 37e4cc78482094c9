"""The naive reference: a prior trained on the observations as if they were clean data.

Only for channels whose observation ``y`` has the clean data's shape (masks, blur, noise, JPEG).
Posterior samples through MMPS with that prior, like EM-MMPS, for linear channels; through DPS,
like DPS-EM (``dps.*`` settings), for a differentiable non-linear one such as ``jpeg``. Every
lap trains on the same observations, so the curve shows what the budget buys without any EM.
"""

from __future__ import annotations

from typing import Any

from diffem_cli.core.errors import DiffemError
from diffem_cli.diffusion.denoise import NetworkDenoiser
from diffem_cli.methods.base import MStep, Posterior, model_device
from diffem_cli.methods.dps_em import DPS_PASSES, DPSOptions, RunSeeded, differentiable_only, dps_posterior
from diffem_cli.methods.em_mmps import MMPSOptions, linear_only, mmps_make, mmps_passes, prior_mstep


class Naive(RunSeeded):
    name = "naive"
    description = "naive: a prior trained on the observations as if clean, MMPS (or DPS) posterior"
    order = 30
    compared_by_default = True
    option_classes = {"mmps": MMPSOptions, "dps": DPSOptions}

    def accepts(self, channel: Any) -> str | None:  # noqa: D102
        if getattr(channel, "linear", False):
            return linear_only(self.name, channel)
        return differentiable_only("dps-em", channel)

    def check(self, data) -> None:  # noqa: D102
        y = data.obs.get("y")
        if y is None or tuple(y.shape[1:]) != data.shape:
            raise DiffemError(
                f"method 'naive' trains on the observations as clean data; channel "
                f"{data.channel.name!r} gives observations of another shape than the data"
            )
        super().check(data)

    def mstep(self, data, prev, lap, laps, clean, cfg) -> MStep:  # noqa: D102
        return prior_mstep(data.obs["y"], lap, cfg, self.options["mmps"])

    def passes_per_step(self, channel: Any) -> float:  # noqa: D102
        return mmps_passes(self.options["mmps"]) if getattr(channel, "linear", False) else DPS_PASSES

    def posterior(self, model, data, aux) -> Posterior:  # noqa: D102
        if data.channel.linear:
            prior = NetworkDenoiser(model)
            return Posterior(mmps_make(prior, data.channel, self.options["mmps"], aux, model_device(model)))
        return dps_posterior(model, data, self.options["dps"], self.seed)
