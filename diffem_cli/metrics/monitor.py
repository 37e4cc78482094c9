"""The label-free monitor: how far the model's observations are from the real ones.

EM decreases a divergence between the distribution of the real observations ``y`` and that of
the model's observations ``A(x) + noise`` (x from the model). Corrupting the lap's
reconstructions afresh (new masks, projections, noise: the channel's own randomness) gives
samples of the model's observation distribution with no clean data, so a user sees convergence,
or collapse, on their own data.

The distance is the sliced Wasserstein-2 distance between the two sets of observations, each
observation read as one vector (its tensors flattened and joined, so a projection channel's
``A`` counts along with its ``y``). Finite sets put a floor under it: the monitor compares the
real observations of one half of the rows with the simulated ones of the other half (both ways,
averaged), and the floor is the same distance between the real observations of the two halves,
so a perfect model scores the floor in expectation; differences well under the floor's size are
sampling noise.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from diffem_cli.metrics.sliced import projections, sliced_from_sorted, sorted_projections


def observation_vectors(obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Each observation as one float64 vector: its tensors (by key name) flattened and joined."""
    return torch.cat([obs[k].flatten(1).double() for k in sorted(obs)], dim=1)


def halves(n: int, n_points: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint sets of row numbers of ``n`` rows, each of ``min(n // 2, n_points)`` rows,
    drawn by a permutation fixed by ``seed`` (rows in storage order may be sorted by class)."""
    k = min(n // 2, n_points)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[:k], order[k : 2 * k]


def projected(
    obs: Mapping[str, torch.Tensor], rows: torch.Tensor, theta: torch.Tensor, chunk: int = 256
) -> torch.Tensor:
    """The observations ``rows`` as vectors projected on the directions ``theta`` (``(dim, P)``),
    ``chunk`` rows at a time, so large images never sit in float64 all at once."""
    parts = [
        observation_vectors({k: v[rows[s : s + chunk]] for k, v in obs.items()}) @ theta
        for s in range(0, len(rows), chunk)
    ]
    return torch.cat(parts)


@dataclass(frozen=True)
class RealSide:
    """The real observations' half of the monitor, the same every lap of a run: the directions,
    the sorted projections of the rows ``first`` and ``second``, and the floor between them."""

    theta: torch.Tensor
    first: torch.Tensor
    second: torch.Tensor
    floor: float


def real_side(
    real: Mapping[str, torch.Tensor], first: torch.Tensor, second: torch.Tensor, seed: int = 0
) -> RealSide:
    """The :class:`RealSide` of the real observations ``real`` (256 directions fixed by ``seed``)."""
    theta = projections(sum(v[0].numel() for v in real.values()), seed=seed)
    a = sorted_projections(projected(real, first, theta))
    b = sorted_projections(projected(real, second, theta))
    return RealSide(theta, a, b, sliced_from_sorted(a, b))


def observation_distance(
    real: Mapping[str, torch.Tensor],
    simulated: Mapping[str, torch.Tensor],
    first: torch.Tensor,
    second: torch.Tensor,
    seed: int = 0,
    side: RealSide | None = None,
) -> dict[str, float]:
    """``obs_sw2``: the mean of the sliced W2 distances (256 directions fixed by ``seed``) between
    the real observations of rows ``first`` and the simulated ones of rows ``second``, and the
    other way round (``simulated`` holds the rows ``first`` then ``second``);
    ``obs_sw2_floor``: the same distance between the real observations of ``first`` and
    ``second``. ``side``: :func:`real_side` of the same arguments, computed once for many laps."""
    side = side if side is not None else real_side(real, first, second, seed)
    sim = projected(simulated, torch.arange(len(first) + len(second)), side.theta)
    sim_a, sim_b = sorted_projections(sim[: len(first)]), sorted_projections(sim[len(first) :])
    monitor = (sliced_from_sorted(side.first, sim_b) + sliced_from_sorted(side.second, sim_a)) / 2
    return {"obs_sw2": monitor, "obs_sw2_floor": side.floor}
