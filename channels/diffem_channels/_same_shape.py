"""Shared conditioning of the channels whose observation ``y`` has the clean data's shape
(``blur``, ``jpeg``, ``noise``): the network is conditioned on ``y`` itself."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from diffem_channels.base import Channel

if TYPE_CHECKING:
    import torch


class SameShapeChannel(Channel):
    """A channel observing ``y`` of the data's own shape; conditions on ``y`` (``cond_size`` = C or n)."""

    def condition(self, obs: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        return obs["y"]

    def cond_size(self, shape: tuple[int, ...]) -> int:
        self.check_data(tuple(shape))
        return shape[0]
