"""Gaussian posteriors: exact moments against closed-form joint conditioning, sampling statistics,
the matrix-free CG path against the dense one, and each float32 low-rank path (diagonal Woodbury,
spectral, shared) against float64 conditioning to its condition number times float32 eps."""

from __future__ import annotations

import math

import pytest
import torch
from gaussian_cases import (
    F32_EPS,
    Mask,
    Pick,
    Proj,
    SharedProj,
    blur_basis,
    closed_form,
    cond,
    linear_map,
    random_prior,
    spectral_prior,
)

from diffem_channels.base import sample_seeds
from diffem_channels.blur import BlurChannel
from diffem_channels.mask import MaskChannel
from diffem_channels.noise import NoiseChannel
from diffem_channels.projection import ProjectionChannel
from diffem_cli.gaussian.operators import operator_matrix
from diffem_cli.gaussian.posterior import posterior_mean, posterior_moments, posterior_sample


@pytest.mark.parametrize("sigma", [0.0, 0.3])
@pytest.mark.parametrize("kind", ["projection", "mask", "pick"])
def test_posterior_moments_match_joint_conditioning(kind, sigma):
    d, b = 6, 7
    prior = random_prior(d)
    ch = {
        "projection": Proj(m=3, sigma=sigma),
        "mask": Mask(rho=0.5, sigma=sigma),
        "pick": Pick(sigma=sigma),
    }[kind]
    x = prior.sample(b, torch.Generator().manual_seed(1))
    obs = ch.corrupt(x, sample_seeds(2, range(b)))
    mean, cov = posterior_moments(prior, ch, obs, (d,))
    a = operator_matrix(ch, obs, (d,))
    ref_mean, ref_cov = closed_form(prior, a, obs["y"], sigma)
    assert mean.shape == (b, d) and cov.shape == (b, d, d)
    torch.testing.assert_close(mean, ref_mean, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(cov, ref_cov, atol=1e-6, rtol=1e-6)
    if kind == "mask" and sigma == 0:
        seen = obs["mask"].bool()
        torch.testing.assert_close(mean[seen], obs["y"][seen].double(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("prior_rank", [None, 2])
def test_posterior_samples_match_moments(prior_rank):
    d, n = 4, 20000
    prior = random_prior(d, prior_rank)
    ch = Proj(m=2, sigma=0.2)
    obs1 = ch.corrupt(prior.sample(1, torch.Generator().manual_seed(3)), sample_seeds(5, [0]))
    obs = {k: v.expand(n, *v.shape[1:]).contiguous() for k, v in obs1.items()}
    mean, cov = posterior_moments(prior, ch, obs1, (d,))
    for method in ["dense", "cg"]:
        xs = posterior_sample(prior, ch, obs, (d,), torch.Generator().manual_seed(4), method=method)
        xs = xs.double()
        sd = cov[0].diagonal().sqrt()
        assert ((xs.mean(0) - mean[0]).abs() < 5 * sd / math.sqrt(n)).all()
        torch.testing.assert_close(torch.cov(xs.T), cov[0], atol=0.05 * float(sd.max() ** 2), rtol=0)
        if prior_rank is None:
            break


@pytest.mark.parametrize("sigma", [0.0, 0.05])
@pytest.mark.parametrize("kind", ["mask", "projection"])
def test_cg_path_matches_dense_path(kind, sigma):
    d, b = 48, 16
    prior = random_prior(d, rank=5, seed=7)
    ch = Mask(rho=0.6, sigma=sigma) if kind == "mask" else Proj(m=8, sigma=sigma)
    obs = ch.corrupt(prior.sample(b, torch.Generator().manual_seed(8)), sample_seeds(9, range(b)))
    dense = posterior_sample(prior, ch, obs, (d,), torch.Generator().manual_seed(10), method="dense")
    cg = posterior_sample(prior, ch, obs, (d,), torch.Generator().manual_seed(10), method="cg")
    assert cg.dtype == torch.float32 and cg.shape == (b, d)
    torch.testing.assert_close(cg, dense, atol=2e-3, rtol=1e-3)


def test_builtin_projection_and_mask_channels():
    prior = random_prior(5)
    ch = ProjectionChannel(m=2, sigma=0.05)
    obs = ch.corrupt(prior.sample(6, torch.Generator().manual_seed(0)), sample_seeds(1, range(6)))
    mean, cov = posterior_moments(prior, ch, obs, (5,))
    ref_mean, ref_cov = closed_form(prior, obs["A"], obs["y"], 0.05)
    torch.testing.assert_close(mean, ref_mean, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(cov, ref_cov, atol=1e-6, rtol=1e-6)

    shape = (3, 2, 2)
    prior = random_prior(12, seed=2)
    for sigma in [0.0, 0.1]:
        ch = MaskChannel(rho=0.5, sigma=sigma)
        x = prior.sample(5, torch.Generator().manual_seed(3)).view(5, *shape)
        obs = ch.corrupt(x, sample_seeds(4, range(5)))
        mean, cov = posterior_moments(prior, ch, obs, shape)
        a = torch.diag_embed(obs["mask"].expand(-1, 3, -1, -1).reshape(5, -1))
        ref_mean, ref_cov = closed_form(prior, a, obs["y"].reshape(5, -1), sigma)
        torch.testing.assert_close(mean.view(5, -1), ref_mean, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(cov, ref_cov, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("channel", [BlurChannel(sigma=1.0, noise_sigma=0.05), NoiseChannel(sigma=0.1)])
def test_builtin_image_channels_cg_matches_dense(channel):
    shape = (1, 6, 6)
    prior = random_prior(36, rank=4, seed=5)
    x = prior.sample(8, torch.Generator().manual_seed(6)).view(8, *shape)
    obs = channel.corrupt(x, sample_seeds(7, range(8)))
    dense = posterior_sample(prior, channel, obs, shape, torch.Generator().manual_seed(8), method="dense")
    cg = posterior_sample(prior, channel, obs, shape, torch.Generator().manual_seed(8), method="cg")
    assert cg.shape == (8, *shape)
    torch.testing.assert_close(cg, dense, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("sigma", [0.0, 0.1])
def test_cg_under_a_cosine_residual_prior_matches_dense(sigma):
    """A prior diagonal in each channel's cosine basis (the Gaussian start's ``cosine`` residual)
    through a mask: the CG path, preconditioned by the residual's per-pixel variances, matches the
    dense float64 posterior."""
    from diffem_cli.gaussian.cosine import cosine_basis

    shape = (3, 5, 5)
    prior = spectral_prior(cosine_basis(5, 5), 75, 3, seed=11)
    ch = MaskChannel(rho=0.5, sigma=sigma)
    x = prior.sample(6, torch.Generator().manual_seed(12)).view(6, *shape)
    obs = ch.corrupt(x, sample_seeds(13, range(6)))
    dense = posterior_sample(prior, ch, obs, shape, torch.Generator().manual_seed(14), method="dense")
    cg = posterior_sample(prior, ch, obs, shape, torch.Generator().manual_seed(14), method="cg")
    torch.testing.assert_close(cg, dense, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("sigma", [0.0, 0.1])
def test_diagonal_woodbury_is_the_exact_posterior(sigma):
    """Mask + low-rank-plus-diagonal prior: the float32 Woodbury mean and covariance (exact, from
    linearity in the normals) agree with float64 joint conditioning, to kappa * float32 eps."""
    shape = (3, 2, 4)
    d = 24
    prior = random_prior(d, rank=3, seed=30)
    ch = MaskChannel(rho=0.4, sigma=sigma)
    x = prior.sample(2, torch.Generator().manual_seed(31)).view(2, *shape)
    obs = ch.corrupt(x, sample_seeds(32, range(2)))
    ref_mean, ref_cov = posterior_moments(prior, ch, obs, shape)
    mean = posterior_mean(prior, ch, obs, shape, method="diagonal")
    for i in range(2):
        one = {k: v[i : i + 1] for k, v in obs.items()}
        a = operator_matrix(ch, one, shape)[0]
        tol = 50 * cond(prior, a, max(sigma, 1e-4)) * F32_EPS
        scale = float(ref_cov[i].diagonal().max())
        m1, c1 = linear_map(prior, ch, one, shape, "diagonal")
        torch.testing.assert_close(mean[i].double(), ref_mean[i], atol=tol * 3, rtol=tol)
        torch.testing.assert_close(m1.view(shape), ref_mean[i], atol=tol * 3, rtol=tol)
        torch.testing.assert_close(c1, ref_cov[i], atol=tol * scale, rtol=0)


def test_spectral_path_is_the_exact_posterior():
    """Blur (symmetric, shared A) + a prior diagonal in its eigenbasis: posterior mean and covariance
    in eigen-coordinates equal float64 joint conditioning, to kappa * float32 eps."""
    shape = (2, 5, 5)
    ch = BlurChannel(sigma=0.8, noise_sigma=0.05)
    basis, a = blur_basis(ch, shape)
    prior = spectral_prior(basis, 50, 2, seed=33)
    x = prior.sample(3, torch.Generator().manual_seed(34)).view(3, *shape)
    obs = ch.corrupt(x, sample_seeds(35, range(3)))
    ref_mean, ref_cov = posterior_moments(prior, ch, obs, shape)
    tol = 50 * cond(prior, a, 0.05) * F32_EPS
    mean = posterior_mean(prior, ch, obs, shape, method="spectral")
    torch.testing.assert_close(mean.double(), ref_mean, atol=tol, rtol=tol)
    one = {k: v[:1] for k, v in obs.items()}
    _, cov = linear_map(prior, ch, one, shape, "spectral")
    torch.testing.assert_close(cov, ref_cov[0], atol=tol * float(ref_cov[0].diagonal().max()), rtol=0)
    # the same prior through the dense shared factorisation and through CG agrees as well
    for method in ("shared", "cg"):
        other = posterior_mean(prior, ch, obs, shape, method=method, jitter=1e-9)
        torch.testing.assert_close(other.double(), ref_mean, atol=1e-3, rtol=1e-3)


def test_shared_operator_path_is_the_exact_posterior():
    """One non-symmetric A for every sample: one dense float32 Cholesky of A Sigma A^T + s^2 I."""
    d = 12
    prior = random_prior(d, rank=2, seed=36)
    ch = SharedProj(m=5, sigma=0.1)
    obs = ch.corrupt(prior.sample(4, torch.Generator().manual_seed(37)), sample_seeds(38, range(4)))
    ref_mean, ref_cov = posterior_moments(prior, ch, obs, (d,))
    a = operator_matrix(ch, obs, (d,))[0]
    tol = 50 * cond(prior, a, 0.1) * F32_EPS
    mean = posterior_mean(prior, ch, obs, (d,), method="shared")
    torch.testing.assert_close(mean.double(), ref_mean, atol=tol, rtol=tol)
    _, cov = linear_map(prior, ch, {k: v[:1] for k, v in obs.items()}, (d,), "shared")
    torch.testing.assert_close(cov, ref_cov[0], atol=tol * float(ref_cov[0].diagonal().max()), rtol=0)
    with pytest.raises(ValueError, match="needs 'shared'"):
        posterior_mean(prior, ch, obs, (d,), method="diagonal")


def test_noiseless_blur_samples_reproduce_the_observation():
    shape = (3, 6, 6)
    ch = BlurChannel(sigma=1.0)
    basis, _ = blur_basis(ch, shape)
    prior = spectral_prior(basis, 108, 3, seed=39)
    x = prior.sample(20, torch.Generator().manual_seed(40)).view(20, *shape)
    obs = ch.corrupt(x, sample_seeds(41, range(20)))
    xs = posterior_sample(prior, ch, obs, shape, torch.Generator().manual_seed(42))
    rel = float((ch.A(obs, xs) - obs["y"]).norm() / obs["y"].norm())
    assert rel < 1e-2, rel  # the jitter floor (1e-5 of the signal power) is the only slack
    again = posterior_sample(prior, ch, obs, shape, torch.Generator().manual_seed(43))
    assert float((xs - again).norm() / x.norm()) > 1e-3  # samples: the weakly seen frequencies vary
