"""``box``: one random axis-aligned rectangle per image is missing (inpainting)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from diffem_channels._masked import MASK_STREAM, MaskedChannel
from diffem_channels.base import ChannelError, Param, in_range, non_negative, per_sample

if TYPE_CHECKING:
    import torch


def _interval(u_size: torch.Tensor, u_pos: torch.Tensor, lo: float, hi: float, side: int) -> torch.Tensor:
    """(B, side) booleans marking, per sample, a run whose length is a fraction in [lo, hi] of ``side``."""
    import torch

    length = torch.round((lo + (hi - lo) * u_size) * side).clamp(1, side)
    start = torch.floor(u_pos * (side - length + 1)).clamp(max=side - length)
    pos = torch.arange(side, dtype=length.dtype)
    return (pos >= start[:, None]) & (pos < (start + length)[:, None])


class BoxChannel(MaskedChannel):
    """Masks one rectangle per image; height and width are independent fractions of the sides."""

    name = "box"
    description = "Box inpainting: one random rectangle per image is missing, plus optional noise."
    data_kinds = frozenset({"image"})
    params = (
        Param(
            "min_size",
            float,
            0.25,
            "smallest box side, as a fraction of the image side",
            in_range(0, 1, lo_open=True),
        ),
        Param(
            "max_size",
            float,
            0.5,
            "largest box side, as a fraction of the image side",
            in_range(0, 1, lo_open=True),
        ),
        Param("sigma", float, 0.0, "std of Gaussian noise added to the observed pixels", non_negative),
    )

    def validate(self) -> None:
        if self.min_size > self.max_size:
            raise ChannelError(
                f"parameter 'min_size'={self.min_size} must not exceed 'max_size'={self.max_size}"
            )

    def draw_mask(self, shape: tuple[int, ...], seeds: torch.Tensor) -> torch.Tensor:
        _, h, w = shape
        u = per_sample(seeds, (4,), "rand", MASK_STREAM)
        rows = _interval(u[:, 0], u[:, 1], self.min_size, self.max_size, h)
        cols = _interval(u[:, 2], u[:, 3], self.min_size, self.max_size, w)
        hidden = rows[:, :, None] & cols[:, None, :]
        return (~hidden).float()[:, None]
