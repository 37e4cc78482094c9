"""A lap's label-free monitor (:mod:`diffem_cli.metrics.monitor`): the real observations against
fresh corruptions of the lap's reconstructions, in the lap record, no clean data needed."""

from __future__ import annotations

import torch

from diffem_channels import mix_seed
from diffem_cli.io.observations import Observations, recorrupt
from diffem_cli.metrics.monitor import RealSide, halves, observation_distance, real_side

# Sets the monitor's corruption seeds apart from the M-step's re-corruptions of the same lap.
MONITOR_TAG = 0x4D4F4E


class Monitor:
    """The monitor of one observations set, lap after lap: the real observations' side
    (:func:`~diffem_cli.metrics.monitor.real_side`) is computed at the first lap and kept."""

    def __init__(self, data: Observations, seed: int, n_points: int) -> None:
        self.data, self.seed = data, seed
        self._first, self._second = halves(len(data), n_points)
        self._side: RealSide | None = None

    def __call__(self, x: torch.Tensor, lap: int) -> dict[str, float]:
        """``obs_sw2`` and ``obs_sw2_floor`` of reconstructions ``x`` (rows aligned with the
        observations) at lap ``lap``; {} with fewer than two observations."""
        if len(self.data) < 2:
            return {}
        rows = torch.cat([self._first, self._second])
        data = self.data
        simulated = recorrupt(data.channel, x[rows], mix_seed(self.seed, MONITOR_TAG), lap, data.index[rows])
        real = {k: data.obs[k] for k in simulated}
        if self._side is None:
            self._side = real_side(real, self._first, self._second)
        return observation_distance(real, simulated, self._first, self._second, side=self._side)


def monitor_record(
    data: Observations, x: torch.Tensor, seed: int, lap: int, n_points: int
) -> dict[str, float]:
    """``obs_sw2`` and ``obs_sw2_floor`` of reconstructions ``x`` (rows aligned with ``data``),
    on at most ``n_points`` rows per half; {} with fewer than two observations."""
    return Monitor(data, seed, n_points)(x, lap)
