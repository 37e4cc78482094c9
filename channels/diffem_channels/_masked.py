"""Shared machinery of the channels that hide entries behind a 0/1 mask (``mask``, ``box``).

Subclasses only say how to draw the mask; observing, conditioning and the linear form
``A x = mask * x`` live here once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from diffem_channels.base import Channel, ImportField, Observation, data_kind, per_sample

if TYPE_CHECKING:
    import torch

MASK_STREAM = 0
NOISE_STREAM = 1


class MaskedChannel(Channel):
    """A channel ``y = mask * (x + sigma * eps)`` with a per-sample 0/1 mask; missing entries are 0.

    Subclasses implement :meth:`draw_mask` and declare a float parameter ``sigma``.
    """

    linear = True
    api_version = 2
    masked_observation = True

    def draw_mask(self, shape: tuple[int, ...], seeds: torch.Tensor) -> torch.Tensor:
        """Float 0/1 mask (1 = observed) for data ``shape``, one per seed: ``(B, 1 or C, H, W)`` for
        images, ``(B, n)`` for vectors. Must use stream :data:`MASK_STREAM` of ``per_sample``."""
        raise NotImplementedError

    def mask_channels(self, shape: tuple[int, ...]) -> int:
        """Channels of the mask for image data ``shape`` (1 when shared by colour channels)."""
        return 1

    def corrupt(self, x: torch.Tensor, seeds: torch.Tensor) -> Observation:
        self.check_data(tuple(x.shape[1:]))
        mask = self.draw_mask(tuple(x.shape[1:]), seeds).to(x)
        y = mask * x
        if self.sigma > 0:
            eps = per_sample(seeds, tuple(x.shape[1:]), "randn", NOISE_STREAM).to(x)
            y = y + mask * (self.sigma * eps)
        return {"y": y, "mask": mask}

    def condition(self, obs: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        import torch

        return torch.cat([obs["y"], obs["mask"].to(obs["y"])], dim=1)

    def cond_size(self, shape: tuple[int, ...]) -> int:
        self.check_data(tuple(shape))
        if data_kind(tuple(shape)) == "vector":
            return 2 * shape[0]
        return shape[0] + self.mask_channels(tuple(shape))

    def A(self, obs: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return obs["mask"].to(x) * x

    def At(self, obs: Mapping[str, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        return obs["mask"].to(y) * y

    def noise_std(self, obs: Mapping[str, torch.Tensor]) -> float:
        return float(self.sigma)

    def import_fields(self, shape: tuple[int, ...]) -> tuple[ImportField, ...]:
        """The mask, 1 = observed: mask images (white = observed, black = missing) or a column."""
        shape = tuple(shape)
        self.check_data(shape)
        mask_shape = shape if data_kind(shape) == "vector" else (self.mask_channels(shape), *shape[1:])
        return (
            ImportField(
                "mask",
                mask_shape,
                values=(0.0, 1.0),
                binary=True,
                sources=("images", "column", "safetensors"),
                help="1 where the entry is observed, 0 where it is missing (images: white = observed)",
            ),
        )

    def observation_mask(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The mask broadcast to the data's shape (a mask shared by colour channels is repeated)."""
        y = obs["y"]
        return obs["mask"].to(y).expand_as(y).contiguous()
