"""DiffEM (arXiv:2510.12691): EM whose E-step samples a conditional diffusion model q(x | y).

M-step: fresh corruptions ``y~ ~ Q(. | x)`` of the previous lap's reconstructions ``x``, and the
conditional denoiser fine-tuned on pairs ``(x, cond(y~))``. E-step: one sample of ``q(x | y_i)``
per real observation with the conditional sampler, no guidance.
"""

from __future__ import annotations

from typing import Any

import torch

from diffem_channels import sample_seeds
from diffem_cli.io.observations import Observations
from diffem_cli.methods.base import ConditionalMethod, Refresh


def fresh_conditioning(
    data: Observations, x: torch.Tensor, seed: int, lap: int, index: torch.Tensor
) -> torch.Tensor:
    """The conditioning tensor of a fresh corruption of ``x`` (rows ``index``) for lap ``lap``."""
    from diffem_cli.io.observations import recorrupt

    return data.channel.condition(recorrupt(data.channel, x, seed, lap, index), data.shape)


class DiffEM(ConditionalMethod):
    name = "diffem"
    description = "DiffEM: conditional diffusion model trained on re-corrupted reconstructions"

    def training_data(self, data, prev, lap, clean):  # noqa: D102
        seed = self.cfg.seed
        cond = fresh_conditioning(data, prev, seed, lap, data.index)
        refresh: Refresh | None = None
        if self.cfg.em.recorrupt_every > 0:

            def refresh(r: int) -> dict[str, torch.Tensor]:
                more = data.channel.corrupt(prev, sample_seeds(seed, data.index, lap, r))
                return {"cond": data.channel.condition(more, data.shape)}

        return {"x": prev, "cond": cond}, refresh

    def settings(self) -> dict[str, Any]:
        return {"em": {"recorrupt_every": self.cfg.em.recorrupt_every}}
