"""``blur``: Gaussian blur (zero padding, so the operator is exactly symmetric) plus optional noise."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

from diffem_channels._same_shape import SameShapeChannel
from diffem_channels.base import Observation, Param, non_negative, per_sample, positive

if TYPE_CHECKING:
    import torch


class BlurChannel(SameShapeChannel):
    """``y = G * x + noise_sigma * eps`` with an isotropic Gaussian kernel of std ``sigma`` pixels."""

    name = "blur"
    description = "Gaussian blur (zero-padded borders) plus optional Gaussian noise."
    data_kinds = frozenset({"image"})
    linear = True
    params = (
        Param("sigma", float, 1.0, "std of the Gaussian kernel, in pixels", positive),
        Param("noise_sigma", float, 0.0, "std of Gaussian noise added after blurring", non_negative),
    )

    @property
    def kernel_size(self) -> int:
        """Odd kernel side covering +-3 sigma."""
        return 2 * math.ceil(3 * self.sigma) + 1

    def blur(self, x: torch.Tensor) -> torch.Tensor:
        """The noiseless blur ``G x``; symmetric, so it is also its own adjoint."""
        import kornia

        k = self.kernel_size
        return kornia.filters.gaussian_blur2d(x, (k, k), (self.sigma, self.sigma), border_type="constant")

    def corrupt(self, x: torch.Tensor, seeds: torch.Tensor) -> Observation:
        self.check_data(tuple(x.shape[1:]))
        # float64 inside: float32 convolutions round differently with the batch size, and an
        # observation must depend on its own sample only
        y = self.blur(x.double()).to(x.dtype)
        if self.noise_sigma > 0:
            y = y + self.noise_sigma * per_sample(seeds, tuple(x.shape[1:]), "randn").to(x)
        return {"y": y}

    def A(self, obs: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return self.blur(x)

    def At(self, obs: Mapping[str, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        return self.blur(y)

    def noise_std(self, obs: Mapping[str, torch.Tensor]) -> float:
        return float(self.noise_sigma)
