"""Gaussian moments for MMPS's covariance heuristic, against dense float64 closed forms."""

import torch

from diffem_cli.gaussian.moments import FULL_MAX_DIM, GaussianCovariance, fit_moments
from diffem_cli.gaussian.prior import GaussianPrior

F64 = torch.float64


def _dense_posterior_cov(sigma: torch.Tensor, var: float) -> torch.Tensor:
    eye = torch.eye(len(sigma), dtype=F64)
    return torch.linalg.inv(torch.linalg.inv(sigma) + eye / var)


def test_full_moments_are_the_sample_mean_and_covariance():
    x = torch.randn(500, 5, generator=torch.Generator().manual_seed(0)) * torch.tensor([1.0, 2, 3, 4, 5])
    m = fit_moments(x)
    assert m.full
    assert torch.allclose(m.mean, x.double().mean(0), atol=1e-12)
    assert torch.allclose(m.cov, torch.cov(x.double().T), atol=1e-10)


def test_gaussian_covariance_matches_the_closed_form_full_and_low_rank():
    g = torch.Generator().manual_seed(1)
    d, r = 12, 3
    factor = torch.randn(d, r, generator=g, dtype=F64)
    diag = torch.rand(d, generator=g, dtype=F64) + 0.1
    q = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=F64)).Q  # a block basis on 4 coordinates
    priors = [
        GaussianPrior(mean=torch.zeros(d, dtype=F64), cov=factor @ factor.T + torch.diag(diag)),
        GaussianPrior(mean=torch.zeros(d, dtype=F64), diag=diag, factor=factor),
        GaussianPrior(mean=torch.zeros(d, dtype=F64), diag=diag, factor=factor, basis=q),
    ]
    u = torch.randn(7, d, generator=g, dtype=F64)
    for prior in priors:
        dense = prior.covariance()
        for var in (1e-4, 0.3, 50.0):
            got = GaussianCovariance(prior)(u, var)
            want = u @ _dense_posterior_cov(dense, var).T
            # float64 throughout; condition numbers below 1e6: relative error ~1e-10
            assert torch.allclose(got, want, rtol=1e-8, atol=1e-10), (
                prior.full,
                prior.basis is not None,
                var,
            )


def test_large_data_get_a_low_rank_fit_of_the_requested_rank():
    x = torch.randn(300, FULL_MAX_DIM + 16, generator=torch.Generator().manual_seed(2))
    m = fit_moments(x, rank=8, seed=0)
    assert not m.full and m.factor.shape == (FULL_MAX_DIM + 16, 8)
    assert torch.isfinite(GaussianCovariance(m)(x[:3], 1.0)).all()
