"""The observed-entry residual: zero for consistent reconstructions, the noise level for the truth."""

from __future__ import annotations

import math

import torch

from diffem_channels.mask import MaskChannel
from diffem_channels.noise import NoiseChannel
from diffem_cli.metrics.consistency import mean_observed_residual, observed_residual


def test_zero_when_the_observed_entries_agree_and_counted_per_observed_entry():
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    channel = MaskChannel(rho=0.5)
    obs = channel.corrupt(x, torch.arange(5))
    assert torch.equal(observed_residual(channel, obs, x), torch.zeros(5, dtype=torch.float64))
    shifted = x + 0.25  # off by 0.25 on every entry: 0.25 per observed entry, whatever is hidden
    # x + 0.25 rounds in float32 (|x + 0.25| <= 1.25): each difference is 0.25 within 1.25 * 2^-24
    want = torch.full((5,), 0.25, dtype=torch.float64)
    # (the float64 norm adds rounding of order 1e-16)
    assert torch.allclose(
        observed_residual(channel, obs, shifted), want, rtol=0, atol=1.25 * 2.0**-24 + 1e-12
    )


def test_truth_under_noise_scores_the_noise_level():
    sigma, n, d = 0.2, 64, 256
    x = torch.rand(n, d) * 2 - 1
    channel = NoiseChannel(sigma=sigma)
    obs = channel.corrupt(x, torch.arange(n))
    r = mean_observed_residual(channel, obs, x, batch_size=10)
    # r_i = sigma * chi_d / sqrt(d): mean sigma (1 - 1/(4d)) to first order, sample sd about
    # sigma / sqrt(2 d n); allow 6 of those
    assert math.isclose(r, sigma * (1 - 1 / (4 * d)), abs_tol=6 * sigma / math.sqrt(2 * d * n))
