"""Posterior quality: what K posterior samples per observation say beyond one sample's PSNR.

One-sample PSNR rewards samplers that collapse toward the posterior mean. With K samples
``x_1..x_K`` of each observation and its clean ``x`` this reports:

- the error of one sample (averaged over the K, each taken alone) and of the K-sample mean. For
  exact posterior samples, ``x`` is one more draw from the same posterior, so with posterior
  covariance ``C``: ``E|x_k - x|^2 = 2 tr C`` and ``E|mean_K - x|^2 = (1 + 1/K) tr C``; their
  ratio is ``(K + 1) / (2K)`` (``mse_ratio_exact``). A sampler that collapses has a ratio near 1.
- calibration: the per-entry coverage of the central order-statistic interval
  ``[x_(j), x_(K+1-j)]`` of the K samples. Under an exact posterior ``x`` and the K samples are
  exchangeable, so the rank of ``x`` among the K + 1 values is uniform and the interval covers ``x``
  with probability ``(K + 1 - 2j) / (K + 1)`` (``coverage_expected``), whatever the posterior.
  ``j`` is the largest with that probability at least the nominal level (at least 1: ``[min,
  max]``, ``(K - 1) / (K + 1)``, when K is too small to reach the level). Entries an observation
  gives exactly (noiseless observed pixels) are left out: they are covered trivially.
- ``spread_error_corr``: Pearson correlation, over the same entries, between the samples' standard
  deviation and the absolute error of their mean (does the predicted spread track the error?).
- ``observed_residual``: the mean ``||A x_k - y|| / sqrt(m)`` of the samples (linear channels; see
  :mod:`.consistency`), near the noise level for a posterior sample.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from diffem_cli.core.errors import DiffemError

LEVEL = 0.9
BETTER = {
    **dict.fromkeys(("psnr_one", "psnr_mean", "ssim_one", "ssim_mean", "spread_error_corr"), "higher"),
    **dict.fromkeys(("mse_one", "mse_mean"), "lower"),
}
"""Which way is better for the metrics that have one; the others are read beside their exact value
(``coverage`` against ``coverage_expected``, ``mse_ratio`` against ``mse_ratio_exact``, the
residual against the noise level)."""


def interval_rank(k: int, level: float = LEVEL) -> int:
    """``j`` of the central interval ``[x_(j), x_(K+1-j)]`` of ``k`` samples: the largest ``j >= 1``
    whose exact-posterior coverage ``(k + 1 - 2j) / (k + 1)`` is at least ``level``."""
    if k < 2:
        raise DiffemError(f"a posterior interval needs at least 2 samples per observation, got {k}")
    return max(1, int((k + 1) * (1 - level) / 2 + 1e-9))  # 1e-9: 1 - 0.9 is just under 0.1 in floats


def expected_coverage(k: int, level: float = LEVEL) -> float:
    """The coverage of :func:`interval_rank`'s interval under an exact posterior."""
    j = interval_rank(k, level)
    return (k + 1 - 2 * j) / (k + 1)


def posterior_quality(
    samples: torch.Tensor,
    clean: torch.Tensor | None = None,
    *,
    exact: torch.Tensor | None = None,
    channel: Any = None,
    obs: Mapping[str, torch.Tensor] | None = None,
    value_range: tuple[float, float] | list[float] | None = None,
    level: float = LEVEL,
) -> dict[str, float]:
    """Posterior-quality metrics of ``samples`` ``(K, N, *shape)`` (K samples of N observations).

    ``clean`` ``(N, *shape)``: the data they should recover (without it, only the spread and the
    residual). ``exact``: 0/1 like ``clean``, 1 on entries the observation gives exactly (left out
    of the calibration). ``channel`` and ``obs`` (the N observations): the observed-entry residual,
    for a linear channel. ``value_range``: PSNR/SSIM for images ``(C, H, W)``."""
    if samples.dim() < 3:
        raise DiffemError(f"posterior samples must be (K, N, ...); got shape {tuple(samples.shape)}")
    k, n = samples.shape[:2]
    j = interval_rank(k, level)
    s = samples.double()
    mean = s.mean(0)
    std = s.std(0)  # unbiased over the K samples
    free = torch.ones_like(mean, dtype=torch.bool) if exact is None else exact.to(mean.device) <= 0
    spread = float(std[free].mean()) if free.any() else 0.0
    out: dict[str, float] = {"k": float(k), "n": float(n), "spread": spread}
    if channel is not None and obs is not None and getattr(channel, "linear", False):
        from diffem_cli.metrics.consistency import observed_residual

        out["observed_residual"] = float(
            torch.stack([observed_residual(channel, obs, samples[i]) for i in range(k)]).mean()
        )
    if clean is None:
        return out
    if tuple(clean.shape) != tuple(samples.shape[1:]):
        raise DiffemError(
            f"posterior samples {tuple(samples.shape)} and clean data {tuple(clean.shape)} do not pair"
        )
    x = clean.double()
    mse_one = float(((s - x) ** 2).flatten(2).mean(2).mean())
    mse_mean = float(((mean - x) ** 2).flatten(1).mean(1).mean())
    out.update(
        mse_one=mse_one,
        mse_mean=mse_mean,
        mse_ratio=mse_mean / mse_one if mse_one > 0 else 1.0,
        mse_ratio_exact=(k + 1) / (2 * k),
    )
    if value_range is not None and clean.dim() == 4:
        from diffem_cli.metrics.images import psnr, ssim

        vr = (float(value_range[0]), float(value_range[1]))
        out["psnr_one"] = sum(psnr(samples[i], clean, vr) for i in range(k)) / k
        out["ssim_one"] = sum(ssim(samples[i], clean, vr) for i in range(k)) / k
        out["psnr_mean"] = psnr(mean.to(clean.dtype), clean, vr)
        out["ssim_mean"] = ssim(mean.to(clean.dtype), clean, vr)
    ordered = s.sort(0).values
    inside = (ordered[j - 1] <= x) & (x <= ordered[k - j])
    out["coverage"] = float(inside[free].double().mean()) if free.any() else 1.0
    out["coverage_expected"] = expected_coverage(k, level)
    err, sd = (mean - x).abs()[free], std[free]
    if err.numel() > 1 and float(err.std()) > 0 and float(sd.std()) > 0:
        out["spread_error_corr"] = float(torch.corrcoef(torch.stack([sd, err]))[0, 1])
    return out
