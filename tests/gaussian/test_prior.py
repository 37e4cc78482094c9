"""The Gaussian prior's storage round trip (full, low rank, low rank in a block basis) and its
sampling statistics; what a fit learnt about its channel is not stored."""

from __future__ import annotations

import pytest
import torch
from gaussian_cases import Mask, batches, blur_basis, random_prior, spectral_prior
from safetensors.torch import load_file, save_file

from diffem_channels.base import sample_seeds
from diffem_channels.blur import BlurChannel
from diffem_cli.core.errors import DiffemError
from diffem_cli.gaussian.fit import fit_gaussian
from diffem_cli.gaussian.prior import GaussianPrior


@pytest.mark.parametrize("rank", [None, 3])
def test_prior_round_trip_and_sampling(tmp_path, rank):
    prior = random_prior(6, rank)
    path = tmp_path / "prior.safetensors"
    save_file(prior.to_tensors(), str(path))
    back = GaussianPrior.from_tensors(load_file(str(path)))
    assert back.full == prior.full
    torch.testing.assert_close(back.covariance(), prior.covariance())
    torch.testing.assert_close(back.mean, prior.mean)
    xs = back.sample(40000, torch.Generator().manual_seed(0)).double()
    scale = float(prior.covariance().diagonal().max())
    torch.testing.assert_close(torch.cov(xs.T), prior.covariance(), atol=0.05 * scale, rtol=0)
    with pytest.raises(DiffemError):
        GaussianPrior.from_tensors({"mean": prior.mean})


def test_basis_prior_round_trip(tmp_path):
    basis, _ = blur_basis(BlurChannel(sigma=0.8), (2, 3, 3))
    prior = spectral_prior(basis, 18, 2, seed=56)
    path = tmp_path / "prior.safetensors"
    save_file(prior.to_tensors(), str(path))
    back = GaussianPrior.from_tensors(load_file(str(path)))
    torch.testing.assert_close(back.covariance(), prior.covariance())
    xs = back.sample(40000, torch.Generator().manual_seed(0)).double()
    scale = float(prior.covariance().diagonal().max())
    torch.testing.assert_close(torch.cov(xs.T), prior.covariance(), atol=0.05 * scale, rtol=0)


def test_the_fit_probe_is_a_field_that_is_not_stored():
    d, n = 24, 200
    ch = Mask(rho=0.5, sigma=0.05)
    obs = ch.corrupt(
        random_prior(d, rank=2).sample(n, torch.Generator().manual_seed(1)), sample_seeds(2, range(n))
    )
    prior = fit_gaussian(ch, batches(obs, n), (d,), iters=2, full_max_dim=8, rank=2)
    assert prior.probed is not None
    assert (
        prior.probed.channel is ch and prior.probed.shape == (d,) and prior.probed.operator.kind == "diagonal"
    )
    assert sorted(prior.to_tensors()) == ["diag", "factor", "mean"]
    assert prior.to("cpu").probed is None and GaussianPrior.from_tensors(prior.to_tensors()).probed is None
