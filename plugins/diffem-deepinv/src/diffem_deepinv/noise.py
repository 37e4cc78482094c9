"""deepinv's ``GaussianNoise`` drawing from diffem's per-sample seeds.

This module imports deepinv (and so torchvision) at the top; the channels import it only when they
first compute, so listing them does not load deepinv.
"""

from __future__ import annotations

from typing import Any

import torch
from deepinv.physics import GaussianNoise

from diffem_channels import ChannelError, per_sample

NOISE_STREAM = 1
"""The ``per_sample`` stream of the noise (stream 0 is an inpainting mask's)."""


class SeededGaussianNoise(GaussianNoise):
    """deepinv's ``GaussianNoise(sigma)`` whose ``eps`` comes from diffem's per-sample seeds.

    ``model(y, seeds=seeds)`` returns ``y + sigma * eps`` with ``eps[i] = per_sample(seeds[i:i+1],
    ..., "randn", NOISE_STREAM)``: the same for a sample whatever batch it sits in and on any CPU
    (float64 draws rounded to float32), never from deepinv's ``rng`` or torch's global generator.
    There is no draw at all when ``sigma`` is 0. ``sigma`` is held in float64, so ``float(sigma)``
    gives the channel parameter back exactly.
    """

    def __init__(self, sigma: float = 0.1) -> None:
        super().__init__(sigma=torch.tensor(float(sigma), dtype=torch.float64), rng=None)

    def forward(self, x: torch.Tensor, seeds: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        if float(self.sigma) == 0.0:
            return x
        if seeds is None:
            raise ChannelError("SeededGaussianNoise draws from per-sample seeds: call it with seeds=...")
        eps = per_sample(seeds, tuple(x.shape[1:]), "randn", NOISE_STREAM).to(x)
        return x + self.sigma.to(x) * eps
