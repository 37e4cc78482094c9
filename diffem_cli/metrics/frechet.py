"""Frechet distance between Gaussians fitted to two feature sets (the formula behind FID).

``FD = |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))``. The trace of the matrix square root
is computed without forming it: it is the sum of the square roots of the eigenvalues of
``S_a S_b``, which are those of the symmetric PSD matrix ``S_a^(1/2) S_b S_a^(1/2)``; ``eigvalsh``
of that in float64 stays real and stable even for rank-deficient covariances (fewer samples than
features), where ``scipy.linalg.sqrtm`` can return complex noise.
"""

from __future__ import annotations

import torch

from diffem_cli.core.errors import DiffemError


def moments(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) covariance of ``(n, d)`` features, in float64."""
    f = feats.detach().cpu().double()
    if f.ndim != 2:
        raise DiffemError(f"features must be (samples, dimensions), got shape {tuple(f.shape)}")
    if len(f) < 2:
        raise DiffemError(f"the Frechet distance needs at least 2 samples per set, got {len(f)}")
    mu = f.mean(0)
    c = f - mu
    return mu, c.T @ c / (len(f) - 1)


class Moments:
    """Running mean and covariance of features added chunk by chunk.

    Sums are float64 and taken around the first chunk's mean, which avoids the cancellation of
    ``E[f f^T] - mu mu^T`` when features have a large common offset.
    """

    def __init__(self) -> None:
        self.n = 0
        self.pivot: torch.Tensor | None = None
        self.total = torch.zeros(0, dtype=torch.float64)
        self.outer = torch.zeros(0, 0, dtype=torch.float64)

    def add(self, feats: torch.Tensor) -> None:
        f = feats.detach().cpu().double().flatten(1)
        if len(f) == 0:
            return
        if self.pivot is None:
            self.pivot = f.mean(0)
            self.total = torch.zeros_like(self.pivot)
            self.outer = torch.zeros(len(self.pivot), len(self.pivot), dtype=torch.float64)
        if f.shape[1] != len(self.pivot):
            raise DiffemError(f"feature dimension changed from {len(self.pivot)} to {f.shape[1]}")
        f = f - self.pivot
        self.n += len(f)
        self.total += f.sum(0)
        self.outer += f.T @ f

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and unbiased covariance of everything added."""
        if self.n < 2 or self.pivot is None:
            raise DiffemError(f"the Frechet distance needs at least 2 samples per set, got {self.n}")
        shift = self.total / self.n
        cov = (self.outer - self.n * torch.outer(shift, shift)) / (self.n - 1)
        return self.pivot + shift, cov


def _noise_free(evals: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a PSD matrix with those within rounding noise of zero set to zero.

    ``eigh`` returns the zero eigenvalues of a rank-deficient covariance (fewer samples than
    features) as +-(d * 2^-53 * lambda_max) noise, whose square roots (~1e-8 relative each) would
    otherwise change with the order of the sums (chunk size, threads, CPU).
    """
    tol = len(evals) * torch.finfo(evals.dtype).eps * evals.abs().max().clamp_min(0)
    return torch.where(evals > tol, evals, torch.zeros_like(evals))


def _sqrt_psd(s: torch.Tensor) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh((s + s.T) / 2)
    return (evecs * _noise_free(evals).sqrt()) @ evecs.T


def frechet_from_moments(
    mu_a: torch.Tensor, cov_a: torch.Tensor, mu_b: torch.Tensor, cov_b: torch.Tensor
) -> float:
    """The Frechet distance between ``N(mu_a, cov_a)`` and ``N(mu_b, cov_b)``."""
    mu_a, cov_a, mu_b, cov_b = (t.detach().cpu().double() for t in (mu_a, cov_a, mu_b, cov_b))
    if mu_a.shape != mu_b.shape or cov_a.shape != cov_b.shape:
        raise DiffemError(f"feature dimensions differ: {tuple(mu_a.shape)} vs {tuple(mu_b.shape)}")
    root = _sqrt_psd(cov_a)
    middle = root @ cov_b @ root
    tr_sqrt = _noise_free(torch.linalg.eigvalsh((middle + middle.T) / 2)).sqrt().sum()
    value = ((mu_a - mu_b) ** 2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * tr_sqrt
    return max(float(value), 0.0)


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to feature sets ``(n_a, d)`` and ``(n_b, d)``."""
    if feats_a.ndim != 2 or feats_b.ndim != 2 or feats_a.shape[1] != feats_b.shape[1]:
        raise DiffemError(
            f"feature sets must be (n, d) with one d; got {tuple(feats_a.shape)} and {tuple(feats_b.shape)}"
        )
    return frechet_from_moments(*moments(feats_a), *moments(feats_b))
