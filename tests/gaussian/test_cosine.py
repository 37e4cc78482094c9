"""The 2-D cosine basis: the orthonormal DCT-II (against scipy's), per-pixel variances of a residual
diagonal in it, and the Gaussian start's cosine residual on stationary data."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft
import torch

from diffem_channels.base import sample_seeds
from diffem_channels.mask import MaskChannel
from diffem_cli.gaussian.cosine import cosine_1d, cosine_basis, pixel_variances
from diffem_cli.gaussian.linalg import to_coords
from diffem_cli.gaussian.prior import GaussianPrior
from diffem_cli.gaussian.spectrum import grid_frequencies


@pytest.mark.parametrize("n", [1, 5, 8])
def test_cosine_1d_is_the_orthonormal_dct(n):
    c = cosine_1d(n)
    torch.testing.assert_close(c.T @ c, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    x = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    ref = scipy.fft.dct(x.numpy(), type=2, norm="ortho", axis=1)
    np.testing.assert_allclose((x @ c).numpy(), ref, atol=1e-12, rtol=0)


def test_cosine_basis_coordinates_are_the_2d_dct_of_each_channel():
    h, w = 4, 6
    basis = cosine_basis(h, w)
    # float32 entries: each product of the Gram sums h*w terms of magnitude <= 1, so |error| <= h*w*eps
    eps = h * w * torch.finfo(torch.float32).eps
    torch.testing.assert_close(basis.T @ basis, torch.eye(h * w), atol=eps, rtol=0)
    x = torch.randn(2, 3, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = scipy.fft.dctn(x.numpy(), type=2, norm="ortho", axes=(2, 3)).reshape(2, -1)
    # in float64 the only error is the basis rounded to float32: relative eps per entry, |entry| <= 1
    bound = float(x.abs().sum((1, 2, 3)).max()) * torch.finfo(torch.float32).eps
    np.testing.assert_allclose(to_coords(x.reshape(2, -1), basis.double()).numpy(), ref, atol=bound, rtol=0)


def test_pixel_variances_are_the_diagonal_of_the_covariance():
    basis = cosine_basis(3, 4)
    diag = torch.rand(24, generator=torch.Generator().manual_seed(1)) + 0.1
    prior = GaussianPrior(mean=torch.zeros(24), diag=diag, basis=basis)
    ref = prior.covariance().diagonal()
    torch.testing.assert_close(pixel_variances(diag.double(), basis.double()), ref, atol=1e-12, rtol=0)


def test_the_cosine_residual_fits_stationary_images_that_a_pixel_residual_cannot():
    """8x8 images from a stationary Gaussian (diagonal in the cosine basis, variance falling with
    frequency), half their pixels masked: with two factors, a residual diagonal per pixel has no
    correlation between neighbours, so its posterior mean is far from the true prior's; a residual
    diagonal in the cosine basis is the true prior's form, and comes close to it."""
    from diffem_cli.gaussian.fit import fit_gaussian
    from diffem_cli.gaussian.posterior import posterior_mean

    shape, n = (1, 8, 8), 1024
    basis = cosine_basis(8, 8)
    spectrum = (1.0 / (1.0 + 8.0 * grid_frequencies(basis.double(), shape))).float()
    true = GaussianPrior(mean=torch.zeros(64), diag=spectrum, basis=basis)
    x = true.sample(n, torch.Generator().manual_seed(0)).view(n, *shape)
    ch = MaskChannel(rho=0.5)
    obs = ch.corrupt(x, sample_seeds(0, range(n)))

    def error(prior):
        return float((posterior_mean(prior, ch, obs, shape) - x).square().mean())

    fits = {
        r: fit_gaussian(ch, lambda: [obs], shape, iters=16, rank=2, full_max_dim=0, residual=r)
        for r in ("pixel", "cosine")
    }
    assert fits["pixel"].basis is None
    torch.testing.assert_close(fits["cosine"].basis, basis)
    best = error(true)
    assert error(fits["cosine"]) < 1.15 * best < error(fits["pixel"])
