"""``noise``: additive Gaussian noise, ``y = x + sigma * eps`` (denoising)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from diffem_channels._same_shape import SameShapeChannel
from diffem_channels.base import Observation, Param, per_sample, positive

if TYPE_CHECKING:
    import torch


class NoiseChannel(SameShapeChannel):
    """Identity measurement with white Gaussian noise of std ``sigma``."""

    name = "noise"
    description = "Additive Gaussian noise of std sigma (denoising)."
    data_kinds = frozenset({"image", "vector"})
    linear = True
    gaussian_denoising = True
    params = (Param("sigma", float, 0.1, "std of the additive Gaussian noise", positive),)

    def corrupt(self, x: torch.Tensor, seeds: torch.Tensor) -> Observation:
        self.check_data(tuple(x.shape[1:]))
        return {"y": x + self.sigma * per_sample(seeds, tuple(x.shape[1:]), "randn").to(x)}

    def A(self, obs: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return x

    def At(self, obs: Mapping[str, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        return y

    def noise_std(self, obs: Mapping[str, torch.Tensor]) -> float:
        return float(self.sigma)
