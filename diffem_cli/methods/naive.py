"""The naive reference: a prior trained on the observations as if they were clean data.

Only for channels whose observation ``y`` has the clean data's shape (masks, blur, noise, JPEG).
Posterior samples through MMPS with that prior, like EM-MMPS, for linear channels; through DPS,
like DPS-EM (``dps.*`` settings), for a differentiable non-linear one such as ``jpeg``. Every
lap trains on the same observations, so the curve shows what the budget buys without any EM.
"""

from __future__ import annotations

from typing import Any

from diffem_cli.core.errors import DiffemError
from diffem_cli.methods.base import PriorMethod
from diffem_cli.methods.dps_em import DPSEM


class Naive(PriorMethod):
    name = "naive"
    description = "naive: a prior trained on the observations as if clean, MMPS (or DPS) posterior"

    def __init__(self, cfg):
        super().__init__(cfg)
        self._dps = DPSEM(cfg)

    def check(self, data):  # noqa: D102
        y = data.obs.get("y")
        if y is None or tuple(y.shape[1:]) != data.shape:
            raise DiffemError(
                f"method 'naive' trains on the observations as clean data; channel "
                f"{data.channel.name!r} gives observations of another shape than the data"
            )
        if data.channel.linear:
            super().check(data)
        else:
            self._dps.check(data)

    def training_data(self, data, prev, lap, clean):  # noqa: D102
        return self.prior_data(data.obs["y"], lap), None

    def posterior(self, model, data, sample, *, seed_parts, device, label, ctx=None):  # noqa: D102
        if data.channel.linear:
            return super().posterior(
                model, data, sample, seed_parts=seed_parts, device=device, label=label, ctx=ctx
            )
        return self._dps.posterior(
            model, data, sample, seed_parts=seed_parts, device=device, label=label, ctx=ctx
        )

    def estep_record(self) -> dict[str, Any]:  # noqa: D102
        return self._dps.estep_record()

    def settings(self) -> dict[str, Any]:  # noqa: D102
        return {**super().settings(), **self._dps.settings()}
