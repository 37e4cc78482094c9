"""Covariance shrinkage: the stationary target as a projection, and the cross-validated amount on
data that are stationary and data that are not."""

from __future__ import annotations

import pytest
import torch

from diffem_cli.core.errors import DiffemError
from diffem_cli.gaussian.cosine import cosine_1d
from diffem_cli.gaussian.moments import fit_moments
from diffem_cli.gaussian.shrinkage import (
    GRID,
    apply_shrinkage,
    choose_shrinkage,
    shrink_prior,
    shrinkage_target,
    shrunk,
)

EPS = torch.finfo(torch.float64).eps


def _basis(c: int, h: int, w: int) -> torch.Tensor:
    return torch.block_diag(*[torch.kron(cosine_1d(h), cosine_1d(w))] * c)


def _random_cov(d: int, seed: int) -> torch.Tensor:
    a = torch.randn(d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return a @ a.T / d


def _bound(cov: torch.Tensor) -> float:
    # two products with an orthonormal basis each way, each entry a sum of d^2 terms of size
    # <= max|cov|: the rounding is within 4 d^2 eps max|cov|, doubled for margin
    d = cov.shape[0]
    return 8 * d * d * EPS * float(cov.abs().max())


def test_a_stationary_covariance_is_its_own_target() -> None:
    c, h, w = 2, 3, 4
    k = h * w
    gen = torch.Generator().manual_seed(0)
    coords = torch.zeros(c * k, c * k, dtype=torch.float64)
    for f in range(k):  # one PSD colour block per spatial frequency, nothing between frequencies
        a = torch.randn(c, c, dtype=torch.float64, generator=gen)
        idx = torch.arange(c) * k + f
        coords[idx[:, None], idx[None, :]] = a @ a.T + 0.1 * torch.eye(c, dtype=torch.float64)
    v = _basis(c, h, w)
    cov = v @ coords @ v.T
    torch.testing.assert_close(shrinkage_target(cov, (c, h, w)), cov, atol=_bound(cov), rtol=0)


def test_the_target_is_a_projection_that_keeps_the_total_variance() -> None:
    shape = (3, 2, 4)
    cov = _random_cov(24, 1)
    target = shrinkage_target(cov, shape)
    torch.testing.assert_close(shrinkage_target(target, shape), target, atol=_bound(cov), rtol=0)
    torch.testing.assert_close(target, target.T, atol=_bound(cov), rtol=0)
    assert float(target.trace()) == pytest.approx(float(cov.trace()), abs=_bound(cov) * 24)
    # principal blocks of a PSD matrix are PSD, so the target is too
    assert float(torch.linalg.eigvalsh(target).min()) > -_bound(cov) * 24
    off = shrinkage_target(cov, (4, 6))  # not an image: the diagonal
    assert torch.equal(off, torch.diag(cov.diagonal()))


def test_shrunk_mixes_linearly() -> None:
    cov, target = _random_cov(5, 2), _random_cov(5, 3)
    assert torch.equal(shrunk(cov, target, 0.0), cov)
    torch.testing.assert_close(
        shrunk(cov, target, 0.25), 0.75 * cov + 0.25 * target, atol=4 * EPS, rtol=4 * EPS
    )


def _stationary_rows(n: int, shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    c, h, w = shape
    fy = torch.arange(h, dtype=torch.float64)[:, None]
    fx = torch.arange(w, dtype=torch.float64)[None, :]
    scale = (1.0 / (1.0 + fy * fy + fx * fx)).reshape(-1).repeat(c).sqrt()  # a 1/f^2 spectrum
    z = torch.randn(n, c * h * w, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return ((z * scale) @ _basis(c, h, w).T).reshape(n, *shape)


def test_few_stationary_rows_are_shrunk_hard() -> None:
    # 80 rows in 64 dimensions: each fold's sample covariance (64 rows) is singular, so no
    # shrinkage gives held-out rows zero likelihood, and the target is the true structure
    x = _stationary_rows(80, (1, 8, 8), 0)
    assert choose_shrinkage(x, (1, 8, 8)) >= 0.5


def test_many_rows_of_non_stationary_data_keep_their_covariance() -> None:
    # independent pixels whose variances span a factor of 400: the stationary target spreads each
    # frequency's variance evenly over the pixels, far from the truth, and 40 rows per dimension
    # make the sample covariance accurate
    shape = (1, 4, 4)
    std = torch.linspace(0.05, 1.0, 16, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(640, 16, dtype=torch.float64, generator=gen) * std).reshape(640, *shape)
    assert choose_shrinkage(x, shape) <= 0.05


def test_the_choice_is_reproducible_and_needs_enough_rows() -> None:
    x = _stationary_rows(60, (1, 4, 4), 3)
    assert choose_shrinkage(x, (1, 4, 4), seed=5) == choose_shrinkage(x, (1, 4, 4), seed=5)
    assert choose_shrinkage(x, (1, 4, 4)) in GRID
    assert choose_shrinkage(x[:9], (1, 4, 4)) == 0.0  # fewer than two rows per fold


def test_shrink_prior_moves_the_full_covariance_only() -> None:
    x = _stationary_rows(40, (1, 4, 4), 4).float()
    plain = fit_moments(x)
    cov = plain.covariance()
    half = shrink_prior(plain, (1, 4, 4), 0.5)
    assert torch.equal(half.covariance(), shrunk(cov, shrinkage_target(cov, (1, 4, 4)), 0.5))
    assert shrink_prior(plain, (1, 4, 4), 0.0) is plain
    low = fit_moments(x, rank=2, full_max_dim=8)  # 16 > 8: low rank, never shrunk
    assert not low.full and shrink_prior(low, (1, 4, 4), 0.5) is low


def test_apply_shrinkage_chooses_only_when_asked_and_never_for_a_low_rank_prior() -> None:
    x = _stationary_rows(40, (1, 4, 4), 5).float()
    full, low = fit_moments(x), fit_moments(x, rank=2, full_max_dim=8)
    calls: list[int] = []

    def choose() -> float:
        calls.append(1)
        return 0.3

    prior, amount = apply_shrinkage(full, (1, 4, 4), "k", "auto", choose)
    assert amount == 0.3 and calls == [1]
    assert torch.equal(prior.covariance(), shrink_prior(full, (1, 4, 4), 0.3).covariance())
    assert apply_shrinkage(full, (1, 4, 4), "k", "0.5", choose)[1] == 0.5 and calls == [1]
    assert apply_shrinkage(full, (1, 4, 4), "k", "off", choose) == (full, 0.0)
    assert apply_shrinkage(low, (1, 4, 4), "k", "auto", choose) == (low, 0.0) and calls == [1]
    with pytest.raises(DiffemError, match="k"):
        apply_shrinkage(full, (1, 4, 4), "k", "2", choose)
