"""The naive reference: a prior trained on the observations as if they were clean data.

Only for channels whose observation ``y`` has the clean data's shape (masks, blur, noise, JPEG).
Posterior samples through MMPS with that prior, like EM-MMPS. Every lap trains on the same
observations, so the curve shows what the budget buys without any EM.
"""

from __future__ import annotations

from diffem_cli.errors import DiffemError
from diffem_cli.methods.base import PriorMethod


class Naive(PriorMethod):
    name = "naive"
    description = "naive: a prior trained on the observations as if clean, MMPS posterior"

    def check(self, data):  # noqa: D102
        y = data.obs.get("y")
        if y is None or tuple(y.shape[1:]) != data.shape:
            raise DiffemError(
                f"method 'naive' trains on the observations as clean data; channel "
                f"{data.channel.name!r} gives observations of another shape than the data"
            )
        super().check(data)

    def training_data(self, data, prev, lap, clean):  # noqa: D102
        return self.prior_data(data.obs["y"], lap), None
