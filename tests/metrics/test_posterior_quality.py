"""Posterior-quality metrics: the interval's exact coverage, and calibration and the K-sample mean's
gain on a Gaussian prior under a noisy mask, where diffem's dense Gaussian posterior is exact."""

from __future__ import annotations

import math

import pytest
import torch

from diffem_channels import sample_seeds
from diffem_channels.mask import MaskChannel
from diffem_cli.core.errors import DiffemError
from diffem_cli.gaussian.posterior import posterior_sample
from diffem_cli.gaussian.prior import GaussianPrior
from diffem_cli.metrics.posterior_quality import expected_coverage, interval_rank, posterior_quality

SHAPE = (1, 4, 4)
D = 16


def test_interval_rank_and_its_exact_coverage():
    # (K + 1 - 2j) / (K + 1) >= 0.9  <=>  j <= (K + 1) / 20
    assert [interval_rank(k) for k in (2, 8, 19, 39, 59)] == [1, 1, 1, 2, 3]
    assert expected_coverage(8) == pytest.approx(7 / 9)
    assert expected_coverage(19) == pytest.approx(0.9)
    assert expected_coverage(39) == pytest.approx(0.9)
    assert expected_coverage(9, level=0.5) == pytest.approx(0.6)  # j = 2: 6 / 10
    with pytest.raises(DiffemError, match="at least 2 samples"):
        interval_rank(1)


def _prior() -> GaussianPrior:
    g = torch.Generator().manual_seed(0)
    f = torch.randn(D, D, generator=g, dtype=torch.float64) / math.sqrt(D)
    mean = 0.3 * torch.randn(D, generator=g, dtype=torch.float64)
    return GaussianPrior(mean=mean, cov=f @ f.T + 0.05 * torch.eye(D, dtype=torch.float64))


@pytest.mark.parametrize("k", [8, 19])
def test_calibration_and_the_mean_gain_under_an_exact_posterior(k):
    """Exact posterior samples: coverage and the MSE ratio hit their closed forms within 4 standard
    errors; the spread tracks the error; the residual stays under the noise level."""
    n, sigma = 1500, 0.1
    prior = _prior()
    g = torch.Generator().manual_seed(1)
    root = torch.linalg.cholesky(prior.cov)
    x = (prior.mean + torch.randn(n, D, generator=g, dtype=torch.float64) @ root.T).float().reshape(n, *SHAPE)
    channel = MaskChannel(rho=0.5, sigma=sigma)
    obs = channel.corrupt(x, sample_seeds(0, range(n)))
    tiled = {name: torch.cat([v] * k) for name, v in obs.items()}
    drawn = posterior_sample(prior, channel, tiled, SHAPE, torch.Generator().manual_seed(2), method="dense")
    samples = drawn.float().reshape(k, n, *SHAPE)
    got = posterior_quality(
        samples, x, exact=channel.exact_entries(obs), channel=channel, obs=obs, value_range=(-3.0, 3.0)
    )

    # Coverage: the rank of x among x and its K samples is uniform, so each entry is covered with
    # probability p = coverage_expected. Observations are independent; the entries of one are not,
    # but the variance of their mean is at most p (1 - p) (all entries moving together), so the
    # standard error over n observations is at most sqrt(p (1 - p) / n) (0.011 for K = 8).
    p = expected_coverage(k)
    assert got["coverage_expected"] == p
    assert abs(got["coverage"] - p) <= 4 * math.sqrt(p * (1 - p) / n)

    # The mean's gain: x and the samples are i.i.d. given y with covariance C, so per observation
    # E a = 2 tr C / D for a = mean_k |x_k - x|^2 / D and E b = (1 + 1/K) tr C / D for
    # b = |mean_K - x|^2 / D: d = b - (K + 1) / (2K) a has mean 0, and its sample mean over the n
    # independent observations lies within 4 of its standard errors.
    s, xd = samples.double(), x.double()
    a = ((s - xd) ** 2).flatten(2).mean(2).mean(0)
    b = ((s.mean(0) - xd) ** 2).flatten(1).mean(1)
    assert got["mse_one"] == pytest.approx(float(a.mean()), rel=1e-9)
    assert got["mse_mean"] == pytest.approx(float(b.mean()), rel=1e-9)
    ratio = (k + 1) / (2 * k)
    assert got["mse_ratio_exact"] == ratio
    d = b - ratio * a
    assert abs(float(d.mean())) <= 4 * float(d.std()) / math.sqrt(n)
    assert got["psnr_mean"] > got["psnr_one"]  # a smaller MSE per image, on average

    # Observed entries are known to within sigma, missing ones only through the prior: the spread
    # is small where the error is, so the two correlate positively.
    assert got["spread_error_corr"] > 0
    # E|A x_k - y|^2 / m = sigma^2 (x_k and x are exchangeable given y), so by Jensen E r <= sigma;
    # r^2 m / sigma^2 is about chi-square with m ~ 8 (sd of r ~ sigma / 4): over n observations
    # the mean is within 4 * sigma / (4 sqrt(n)) = 0.026 sigma of its expectation.
    assert 0 < got["observed_residual"] <= sigma * (1 + 1 / math.sqrt(n))
    assert got["n"] == n and got["k"] == k


def test_exact_entries_are_left_out_and_clean_data_is_optional():
    g = torch.Generator().manual_seed(0)
    samples = torch.randn(4, 3, *SHAPE, generator=g)
    exact = torch.zeros(3, *SHAPE)
    exact[:, :, 0] = 1
    samples[:, :, :, 0] = 0.5  # pinned entries: every sample equals y there
    clean = samples[0].clone()
    clean[:, :, 1:] = 10.0  # far outside every interval on the free entries
    got = posterior_quality(samples, clean, exact=exact)
    assert got["coverage"] == 0.0  # the trivially covered pinned entries do not count
    assert got["spread"] == pytest.approx(float(samples[:, :, :, 1:].std(0).mean()))
    alone = posterior_quality(samples)
    assert set(alone) == {"k", "n", "spread"}
    with pytest.raises(DiffemError, match="do not pair"):
        posterior_quality(samples, clean[:2])
    with pytest.raises(DiffemError, match=r"\(K, N, \.\.\.\)"):
        posterior_quality(samples[0, 0, 0])
    with pytest.raises(DiffemError, match="at least 2 samples"):
        posterior_quality(samples[:1], clean)
