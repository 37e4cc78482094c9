"""The plugin's own tests: diffem's channel contract in one call, plus what is special to it.

Run from this folder after ``.venv/bin/pip install -e .`` (diffem installed in the same venv):
``.venv/bin/pytest tests``.
"""

import pytest
import torch
import torch.nn.functional as F

from diffem_channels import ChannelError, sample_seeds
from diffem_channels.testing import check_channel
from diffem_downsample import DownsampleChannel


@pytest.mark.parametrize(("factor", "sigma", "shape"), [(2, 0.05, (3, 8, 12)), (4, 0.0, (1, 16, 16))])
def test_contract(factor: int, sigma: float, shape: tuple[int, int, int]) -> None:
    check_channel(DownsampleChannel(factor=factor, sigma=sigma), shape)


def test_observation_is_the_average_pool() -> None:
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    y = DownsampleChannel(factor=2, sigma=0.0).corrupt(x, sample_seeds(0, range(4)))["y"]
    assert torch.equal(y, F.avg_pool2d(x, 2))


def test_sizes_not_divisible_by_the_factor_are_refused() -> None:
    with pytest.raises(ChannelError, match="divisible"):
        DownsampleChannel(factor=3).check_data((3, 8, 12))
