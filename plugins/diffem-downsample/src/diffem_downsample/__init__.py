"""``downsample``: a third-party diffem channel, average pooling by an integer factor plus noise.

The observation is the low-resolution image ``y`` of shape ``(B, C, H/f, W/f)``; a conditional
network sees it upsampled back to ``(H, W)``. The operator is linear, with the exact adjoint
``A^T y = upsample_nearest(y) / f^2``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from diffem_channels import Channel, ChannelError, Observation, Param, non_negative, per_sample

__all__ = ["DownsampleChannel"]
__version__ = "0.1.0"


def _at_least_one(v: int) -> str | None:
    return None if v >= 1 else "must be >= 1"


_at_least_one.constraint = ">= 1"  # type: ignore[attr-defined]


class DownsampleChannel(Channel):
    """``y = avgpool_f(x) + sigma * eps`` (super-resolution by ``factor``)."""

    name = "downsample"
    description = "Average-pool downsampling by an integer factor plus Gaussian noise (super-resolution)."
    data_kinds = frozenset({"image"})
    linear = True
    params = (
        Param(
            "factor",
            int,
            2,
            "downsampling factor; image height and width must be divisible by it",
            _at_least_one,
        ),
        Param("sigma", float, 0.01, "std of Gaussian noise added to the low-resolution image", non_negative),
    )

    def check_data(self, shape: tuple[int, ...]) -> None:
        super().check_data(shape)
        _, h, w = shape
        if h % self.factor or w % self.factor:
            raise ChannelError(
                f"channel 'downsample' needs H and W divisible by factor={self.factor}, got {h}x{w}"
            )

    def corrupt(self, x: torch.Tensor, seeds: torch.Tensor) -> Observation:
        self.check_data(tuple(x.shape[1:]))
        y = self.A({}, x)
        if self.sigma > 0:
            y = y + self.sigma * per_sample(seeds, tuple(y.shape[1:]), "randn").to(y)
        return {"y": y}

    def condition(self, obs: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        return F.interpolate(obs["y"], size=tuple(shape[1:]), mode="nearest")

    def cond_size(self, shape: tuple[int, ...]) -> int:
        self.check_data(tuple(shape))
        return shape[0]

    def A(self, obs: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, self.factor)

    def At(self, obs: Mapping[str, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        return F.interpolate(y, scale_factor=self.factor, mode="nearest") / self.factor**2

    def noise_std(self, obs: Mapping[str, torch.Tensor]) -> float:
        return float(self.sigma)

    def start(self, obs: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        """Start EM from the nearest-neighbour upsampled observation."""
        return self.condition(obs, shape)
