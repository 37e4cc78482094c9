"""Measurement consistency: how far reconstructions are from explaining their own observations.

For a linear channel ``y = A x + s eps`` the observed-entry residual ``||A x - y|| / sqrt(m)``
(``m`` measurements per sample) is a label-free check of an E-step: a posterior sample should
leave a residual near the noise level ``s``, and exactly 0 where a noiseless channel pins
entries. For masking channels ``m`` counts the observed entries only, so a residual of 0.1 means
0.1 per observed pixel however much is hidden.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from diffem_channels import Channel


def observed_residual(channel: Channel, obs: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Per sample ``||A x - y|| / sqrt(m)`` in float64 (``m``: observed entries of a masking
    channel, else the size of ``y``); ``channel`` must be linear."""
    y = obs["y"].double()
    diff = (channel.A(obs, x.to(obs["y"])).double() - y).flatten(1)
    if channel.masked_observation:
        m = channel.observation_mask(obs).flatten(1).sum(1).double().clamp_min(1.0)
    else:
        m = torch.full((len(y),), float(diff.shape[1]), dtype=torch.float64)
    return diff.norm(dim=1) / m.sqrt()


def mean_observed_residual(
    channel: Channel, obs: Mapping[str, torch.Tensor], x: torch.Tensor, batch_size: int = 4096
) -> float:
    """The mean of :func:`observed_residual` over every sample, ``batch_size`` rows at a time."""
    total, n = 0.0, len(x)
    for start in range(0, n, batch_size):
        rows = {k: v[start : start + batch_size] for k, v in obs.items()}
        total += float(observed_residual(channel, rows, x[start : start + batch_size]).sum())
    return total / max(n, 1)
