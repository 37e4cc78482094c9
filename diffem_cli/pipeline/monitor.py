"""A lap's label-free monitor (:mod:`diffem_cli.metrics.monitor`): the real observations against
fresh corruptions of the lap's reconstructions, in the lap record, no clean data needed."""

from __future__ import annotations

import torch

from diffem_channels import mix_seed
from diffem_cli.io.observations import Observations, recorrupt
from diffem_cli.metrics.monitor import halves, observation_distance

# Sets the monitor's corruption seeds apart from the M-step's re-corruptions of the same lap.
MONITOR_TAG = 0x4D4F4E


def monitor_record(
    data: Observations, x: torch.Tensor, seed: int, lap: int, n_points: int
) -> dict[str, float]:
    """``obs_sw2`` and ``obs_sw2_floor`` of reconstructions ``x`` (rows aligned with ``data``),
    on at most ``n_points`` rows per half; {} with fewer than two observations."""
    if len(data) < 2:
        return {}
    first, second = halves(len(data), n_points)
    rows = torch.cat([first, second])
    simulated = recorrupt(data.channel, x[rows], mix_seed(seed, MONITOR_TAG), lap, data.index[rows])
    real = {k: data.obs[k] for k in simulated}
    return observation_distance(real, simulated, first, second)
