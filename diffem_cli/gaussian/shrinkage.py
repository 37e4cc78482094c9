"""A sample covariance shrunk toward a structured target, the amount chosen by cross-validation.

A full sample covariance of ``n`` rows in ``D`` dimensions has ``D (D + 1) / 2`` free entries; with
``n`` near ``D`` it fits those rows far better than new ones (a Gaussian posterior mean built on it
scores several dB better on its own rows than on fresh ones). Shrinking it,
``(1 - s) S + s T``, toward a target ``T`` with few parameters trades that variance for bias:

* images ``(C, H, W)``: the stationary target, ``S`` with every pair of spatial frequencies of the
  2-D cosine basis decoupled but each frequency's ``C x C`` colour covariance kept (natural images
  are close to stationary, and their colours strongly correlated);
* any other shape: the diagonal of ``S``.

:func:`choose_shrinkage` picks ``s`` on a grid by ``K``-fold held-out Gaussian log-likelihood, so
data that are not stationary (centred digits) keep their sample covariance.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from torch import Tensor

from diffem_cli.core.checks import bad
from diffem_cli.gaussian.cosine import cosine_1d
from diffem_cli.gaussian.prior import GaussianPrior

_F64 = torch.float64
GRID: tuple[float, ...] = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.85, 1.0)
"""The shrinkage amounts :func:`choose_shrinkage` tries."""
FOLDS = 5


def parse_shrinkage(key: str, value: str) -> float | None:
    """A shrinkage setting (``key``): None for ``auto``, 0 for ``off``, else the amount, which must
    lie in [0, 1]; a one-line DiffemError otherwise."""
    if value == "auto":
        return None
    if value == "off":
        return 0.0
    try:
        amount = float(value)
    except ValueError:
        amount = math.nan
    if not 0.0 <= amount <= 1.0:
        raise bad(key, value, "auto, off or a number in [0, 1]")
    return amount


def shrinkage_target(cov: Tensor, shape: Sequence[int]) -> Tensor:
    """The structured target of :func:`shrunk` for a ``(D, D)`` covariance of data ``shape``."""
    if len(shape) != 3:
        return torch.diag(cov.diagonal())
    c, h, w = (int(v) for v in shape)
    grid = torch.kron(cosine_1d(h), cosine_1d(w)).to(cov)  # float64, as the float32 cosine_basis is not
    basis = torch.block_diag(*[grid] * c)
    coords = basis.T @ cov @ basis
    freq = torch.arange(c * h * w, device=cov.device) % (h * w)
    coords = coords * (freq[:, None] == freq[None, :]).to(cov)
    return basis @ coords @ basis.T


def shrunk(cov: Tensor, target: Tensor, amount: float) -> Tensor:
    """``(1 - amount) cov + amount target``."""
    return (1.0 - amount) * cov + amount * target


def shrink_prior(prior: GaussianPrior, shape: Sequence[int], amount: float) -> GaussianPrior:
    """``prior`` with its full covariance shrunk by ``amount`` toward its target; a low-rank prior
    as it is."""
    if not prior.full or not amount:
        return prior
    return replace(prior, cov=shrunk(prior.cov, shrinkage_target(prior.cov, shape), amount))


def apply_shrinkage(
    prior: GaussianPrior, shape: Sequence[int], key: str, value: str, choose: Callable[[], float]
) -> tuple[GaussianPrior, float]:
    """``prior`` shrunk as the setting ``key`` = ``value`` asks (:func:`parse_shrinkage`; for
    ``auto``, by the amount ``choose()`` returns, called only then), and that amount; a low-rank
    prior comes back as it is, with 0."""
    if not prior.full:
        return prior, 0.0
    amount = parse_shrinkage(key, value)
    if amount is None:
        amount = choose()
    return shrink_prior(prior, shape, amount), amount


def _loglik(cov: Tensor, rows: Tensor) -> float:
    """Mean Gaussian log-likelihood (up to a constant) of centred ``rows`` under ``N(0, cov)``;
    ``-inf`` when ``cov`` is singular."""
    chol, info = torch.linalg.cholesky_ex(cov)
    if int(info):
        return -math.inf
    white = torch.linalg.solve_triangular(chol, rows.T, upper=False)
    return float(-chol.diagonal().log().sum() - 0.5 * white.square().sum(0).mean())


def choose_shrinkage(
    x: Tensor, shape: Sequence[int], seed: int = 0, grid: Sequence[float] = GRID, folds: int = FOLDS
) -> float:
    """The amount in ``grid`` whose shrunk covariance, fitted on ``folds - 1`` folds of the rows
    ``x`` ``(N, D)``, gives the held-out fold the highest Gaussian log-likelihood, summed over
    folds (ties to the smaller amount); 0 with fewer than two rows per fold."""
    flat = x.reshape(len(x), -1).to(_F64)
    if len(flat) < 2 * folds:
        return 0.0
    gen = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(len(flat), generator=gen).to(flat.device)
    score = torch.zeros(len(grid), dtype=_F64)
    for part in order.tensor_split(folds):
        train = torch.ones(len(flat), dtype=torch.bool, device=flat.device)
        train[part] = False
        fit = flat[train]
        mean = fit.mean(0)
        cov = torch.cov(fit.T)
        target = shrinkage_target(cov, shape)
        held = flat[part] - mean
        for i, amount in enumerate(grid):
            score[i] += _loglik(shrunk(cov, target, amount), held) * len(part)
    return float(grid[int(torch.argmax(score))])


__all__ = [
    "FOLDS",
    "GRID",
    "apply_shrinkage",
    "choose_shrinkage",
    "parse_shrinkage",
    "shrink_prior",
    "shrinkage_target",
    "shrunk",
]
