"""``mask``: each pixel (or vector coordinate) is missing independently with probability ``rho``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from diffem_channels._masked import MASK_STREAM, MaskedChannel
from diffem_channels.base import Param, data_kind, in_range, non_negative, per_sample

if TYPE_CHECKING:
    import torch


class MaskChannel(MaskedChannel):
    """Bernoulli masking; by default one mask per pixel shared by the colour channels."""

    name = "mask"
    description = "Random pixel masking: each pixel missing with probability rho, plus optional noise."
    data_kinds = frozenset({"image", "vector"})
    params = (
        Param("rho", float, 0.75, "probability that an entry is missing", in_range(0, 1, hi_open=True)),
        Param("sigma", float, 0.0, "std of Gaussian noise added to the observed entries", non_negative),
        Param("per_channel", bool, False, "draw a separate mask for each colour channel (images)"),
    )

    def mask_channels(self, shape: tuple[int, ...]) -> int:
        return shape[0] if self.per_channel else 1

    def draw_mask(self, shape: tuple[int, ...], seeds: torch.Tensor) -> torch.Tensor:
        if data_kind(shape) == "image":
            shape = (self.mask_channels(shape), *shape[1:])
        return (per_sample(seeds, shape, "rand", MASK_STREAM) >= self.rho).float()
