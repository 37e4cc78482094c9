"""Lap 0: exact Gaussian posteriors against closed forms, sampling statistics, the matrix-free CG
path against the dense one, EM recovering a known Gaussian, and prior storage round trips."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffem_channels.base import Channel, Param, per_sample, sample_seeds
from diffem_channels.blur import BlurChannel
from diffem_channels.mask import MaskChannel
from diffem_channels.noise import NoiseChannel
from diffem_channels.projection import ProjectionChannel
from diffem_cli.core.errors import DiffemError
from diffem_cli.gaussian.model import (
    GaussianPrior,
    fit_gaussian,
    gaussian_start,
    operator_matrix,
    posterior_mean,
    posterior_moments,
    posterior_sample,
)


class Proj(Channel):
    """Test-local random projections ``y = A x + sigma eps``; the observation stores ``A``."""

    name = "tproj"
    linear = True
    data_kinds = frozenset({"vector"})
    params = (Param("m", int, 2), Param("sigma", float, 0.0))

    def corrupt(self, x, seeds):
        a = per_sample(seeds, (self.m, x.shape[1]), stream=1)
        y = torch.einsum("bmn,bn->bm", a, x) + self.sigma * per_sample(seeds, (self.m,), stream=2)
        return {"y": y, "A": a}

    def A(self, obs, x):
        return torch.einsum("bmn,bn->bm", obs["A"], x)

    def At(self, obs, y):
        return torch.einsum("bmn,bm->bn", obs["A"], y)

    def noise_std(self, obs):
        return self.sigma


class Mask(Channel):
    """Test-local masking ``y = mask * (x + sigma eps)`` for data of any shape."""

    name = "tmask"
    linear = True
    data_kinds = frozenset({"vector", "image"})
    params = (Param("rho", float, 0.5), Param("sigma", float, 0.0))

    def corrupt(self, x, seeds):
        shp = tuple(x.shape[1:])
        keep = (per_sample(seeds, shp, "rand", 1) >= self.rho).float()
        return {"y": keep * (x + self.sigma * per_sample(seeds, shp, stream=2)), "mask": keep}

    def A(self, obs, x):
        return obs["mask"] * x

    def At(self, obs, y):
        return obs["mask"] * y

    def noise_std(self, obs):
        return self.sigma


class Pick(Channel):
    """Test-local weighted subsampling ``y = w * x[idx] + sigma eps``: rows with one entry each."""

    name = "tpick"
    linear = True
    data_kinds = frozenset({"vector"})
    params = (Param("m", int, 3), Param("sigma", float, 0.0))

    def corrupt(self, x, seeds):
        idx = per_sample(seeds, (x.shape[1],), "rand", 1).argsort(1)[:, : self.m]
        w = 0.5 + per_sample(seeds, (self.m,), "rand", 2)
        y = w * x.gather(1, idx) + self.sigma * per_sample(seeds, (self.m,), stream=3)
        return {"y": y, "idx": idx, "w": w}

    def A(self, obs, x):
        return obs["w"] * x.gather(1, obs["idx"])

    def At(self, obs, y):
        out = torch.zeros(y.shape[0], 6, dtype=y.dtype)
        return out.scatter_add(1, obs["idx"], obs["w"] * y)

    def noise_std(self, obs):
        return self.sigma


class Squash(Channel):
    name = "squash"
    data_kinds = frozenset({"vector"})


def random_prior(d: int, rank: int | None = None, seed: int = 0) -> GaussianPrior:
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(d, generator=g, dtype=torch.float64)
    if rank is None:
        f = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
        return GaussianPrior(mean=mean, cov=f @ f.T + 0.2 * torch.eye(d, dtype=torch.float64))
    diag = 0.05 + 0.1 * torch.rand(d, generator=g)
    return GaussianPrior(mean=mean.float(), diag=diag, factor=torch.randn(d, rank, generator=g) * 0.7)


def closed_form(prior: GaussianPrior, a: torch.Tensor, y: torch.Tensor, s: float):
    """Condition the joint Gaussian of (x, y) on the informative entries of y, one sample at a time."""
    cov, mu = prior.covariance(), prior.mean.double()
    means, covs = [], []
    for ai, yi in zip(a.double(), y.double(), strict=True):
        keep = ai.abs().sum(1) > 0
        ai, yi = ai[keep], yi[keep]
        cxy = cov @ ai.T
        cyy = ai @ cov @ ai.T + s**2 * torch.eye(len(yi), dtype=torch.float64)
        means.append(mu + cxy @ torch.linalg.solve(cyy, yi - ai @ mu))
        covs.append(cov - cxy @ torch.linalg.solve(cyy, cxy.T))
    return torch.stack(means), torch.stack(covs)


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


def test_operator_matrix_reproduces_the_channel():
    ch = Proj(m=3)
    x = torch.randn(5, 4)
    obs = ch.corrupt(x, sample_seeds(0, range(5)))
    torch.testing.assert_close(operator_matrix(ch, obs, (4,)), obs["A"].double())
    img = Mask(rho=0.5).corrupt(torch.randn(3, 1, 2, 3), sample_seeds(0, range(3)))
    a = operator_matrix(Mask(), img, (1, 2, 3))
    torch.testing.assert_close(a, torch.diag_embed(img["mask"].reshape(3, -1).double()))


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


def _batches(obs, size):
    n = obs["y"].shape[0]
    return lambda: ({k: v[i : i + size] for k, v in obs.items()} for i in range(0, n, size))


def test_em_recovers_a_gaussian_from_random_projections():
    d, n = 3, 6000
    truth = random_prior(d, seed=11)
    ch = Proj(m=2, sigma=0.05)
    x = truth.sample(n, torch.Generator().manual_seed(12))
    obs = ch.corrupt(x, sample_seeds(13, range(n)))
    stats = []
    prior = fit_gaussian(ch, _batches(obs, n), (d,), iters=30, progress=lambda i, t, s: stats.append(s))
    assert prior.full and len(stats) == 30
    emp_mean, emp_cov = x.double().mean(0), torch.cov(x.double().T)
    assert (prior.mean - emp_mean).abs().max() < 0.1
    assert (prior.cov - emp_cov).abs().max() < 0.15 * float(emp_cov.diagonal().max())
    ll = [s["loglik"] for s in stats]
    assert all(b >= a - 1e-9 for a, b in zip(ll, ll[1:], strict=False)), (
        "exact EM must not lower the likelihood"
    )


@pytest.mark.parametrize("channel", [Mask(rho=0.4, sigma=0.05), Pick(m=4, sigma=0.05)])
def test_em_on_selection_channels_raises_likelihood(channel):
    d, n = 6, 3000
    truth = random_prior(d, seed=14)
    x = truth.sample(n, torch.Generator().manual_seed(15))
    obs = channel.corrupt(x, sample_seeds(16, range(n)))
    stats = []
    prior = fit_gaussian(channel, _batches(obs, n), (d,), iters=25, progress=lambda i, t, s: stats.append(s))
    ll = [s["loglik"] for s in stats]
    assert all(b >= a - 1e-9 for a, b in zip(ll, ll[1:], strict=False))
    assert (prior.mean - x.double().mean(0)).abs().max() < 0.15


def test_em_restarts_from_init_and_converts_forms():
    d, n = 3, 2000
    truth = random_prior(d, seed=11)
    ch = Proj(m=2, sigma=0.05)
    obs = ch.corrupt(truth.sample(n, torch.Generator().manual_seed(12)), sample_seeds(13, range(n)))
    first = fit_gaussian(ch, _batches(obs, 1000), (d,), iters=4)
    resumed = fit_gaussian(ch, _batches(obs, 1000), (d,), iters=4, init=first)
    straight = fit_gaussian(ch, _batches(obs, 1000), (d,), iters=8)
    torch.testing.assert_close(resumed.cov, straight.cov)
    low = fit_gaussian(ch, _batches(obs, 1000), (d,), iters=1, full_max_dim=2, rank=2, init=first)
    assert not low.full and low.factor.shape == (d, 2)


def test_stochastic_em_fits_low_rank_plus_diagonal():
    d, r, n = 32, 3, 4000
    g = torch.Generator().manual_seed(20)
    factor = torch.randn(d, r, generator=g)
    truth = GaussianPrior(mean=torch.randn(d, generator=g), diag=torch.full((d,), 0.1), factor=factor)
    x = truth.sample(n, torch.Generator().manual_seed(21))
    ch = Mask(rho=0.5, sigma=0.01)
    obs = ch.corrupt(x, sample_seeds(22, range(n)))
    prior = fit_gaussian(ch, _batches(obs, n), (d,), iters=8, full_max_dim=16, rank=r)
    assert not prior.full and prior.factor.shape == (d, r)
    emp_cov = torch.cov(x.double().T)
    assert (prior.mean - x.mean(0)).abs().max() < 0.15
    rel = torch.linalg.matrix_norm(prior.covariance() - emp_cov) / torch.linalg.matrix_norm(emp_cov)
    assert rel < 0.15


def test_gaussian_start_is_reproducible_and_batch_independent():
    d, n = 5, 90
    prior = random_prior(d)
    ch = Proj(m=2, sigma=0.1)
    obs = ch.corrupt(prior.sample(n, torch.Generator().manual_seed(1)), sample_seeds(2, range(n)))
    a = torch.cat(list(gaussian_start(prior, ch, _batches(obs, 50), (d,), seed=3)))
    b = torch.cat(list(gaussian_start(prior, ch, _batches(obs, 7)(), (d,), seed=3)))
    c = torch.cat(list(gaussian_start(prior, ch, _batches(obs, 50), (d,), seed=4)))
    assert a.shape == (n, d)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert (a - c).abs().max() > 0.1


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


def test_non_linear_channel_is_refused():
    obs = {"y": torch.zeros(2, 3)}
    with pytest.raises(DiffemError, match="no linear form"):
        fit_gaussian(Squash(), lambda: [obs], (3,))


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


# ---------------------------------------------------------------- float32 low-rank paths


F32_EPS = float(torch.finfo(torch.float32).eps)


class SharedProj(Channel):
    """Test-local projection ``y = A x + sigma eps`` with one fixed ``A`` (m x n) for every sample."""

    name = "tshared"
    linear = True
    data_kinds = frozenset({"vector"})
    params = (Param("m", int, 5), Param("sigma", float, 0.1))

    def matrix(self, n):
        return torch.randn(self.m, n, generator=torch.Generator().manual_seed(123))

    def corrupt(self, x, seeds):
        y = x @ self.matrix(x.shape[1]).T + self.sigma * per_sample(seeds, (self.m,), stream=2)
        return {"y": y}

    def A(self, obs, x):
        return x @ self.matrix(x.shape[1]).T

    def At(self, obs, y):
        return y @ self.matrix(12)

    def noise_std(self, obs):
        return self.sigma


def _linear_map(prior, ch, obs, shape, method):
    """Posterior samples are affine in the normals z: mean + L z. Returns (mean, L L^T) exactly,
    from the samples at z = 0 and z = e_j (one observation)."""
    from diffem_cli.gaussian.model import _sample_from_noise

    nz = prior.noise_dim + obs["y"][0].numel()
    z = torch.cat([torch.zeros(1, nz), torch.eye(nz)])
    rep = {k: v.expand(nz + 1, *v.shape[1:]) for k, v in obs.items()}
    x = _sample_from_noise(prior, ch, rep, shape, z, method, 64, 1e-6, 1e-5).reshape(nz + 1, -1).double()
    lin = (x[1:] - x[:1]).T
    return x[0], lin @ lin.T


def _cond(prior, a, s):
    """Condition number of S = A Sigma A^T + s^2 I on the informative rows (float64)."""
    keep = a.abs().sum(1) > 0
    a = a[keep].double()
    s_mat = a @ prior.covariance() @ a.T + s**2 * torch.eye(a.shape[0], dtype=torch.float64)
    ev = torch.linalg.eigvalsh(s_mat)
    return float(ev[-1] / ev[0])


def _blur_basis(channel, shape):
    """The eigenbasis of one colour block of a blur (the per-channel operator)."""
    obs = channel.corrupt(torch.zeros(1, *shape), sample_seeds(0, [0]))
    a = operator_matrix(channel, obs, shape)[0]
    k = shape[1] * shape[2]
    return torch.linalg.eigh(a[:k, :k])[1].float(), a


def spectral_prior(basis, d, rank, seed):
    """A prior with a decaying spectrum in ``basis`` plus a rank-``rank`` factor."""
    g = torch.Generator().manual_seed(seed)
    k = basis.shape[0]
    gamma = (0.02 + torch.linspace(1.0, 0.05, k)).repeat(d // k)
    return GaussianPrior(
        mean=0.3 * torch.randn(d, generator=g),
        diag=gamma,
        factor=0.5 * torch.randn(d, rank, generator=g),
        basis=basis,
    )


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
        tol = 50 * _cond(prior, a, max(sigma, 1e-4)) * F32_EPS
        scale = float(ref_cov[i].diagonal().max())
        m1, c1 = _linear_map(prior, ch, one, shape, "diagonal")
        torch.testing.assert_close(mean[i].double(), ref_mean[i], atol=tol * 3, rtol=tol)
        torch.testing.assert_close(m1.view(shape), ref_mean[i], atol=tol * 3, rtol=tol)
        torch.testing.assert_close(c1, ref_cov[i], atol=tol * scale, rtol=0)


def test_spectral_path_is_the_exact_posterior():
    """Blur (symmetric, shared A) + a prior diagonal in its eigenbasis: posterior mean and covariance
    in eigen-coordinates equal float64 joint conditioning, to kappa * float32 eps."""
    shape = (2, 5, 5)
    ch = BlurChannel(sigma=0.8, noise_sigma=0.05)
    basis, a = _blur_basis(ch, shape)
    prior = spectral_prior(basis, 50, 2, seed=33)
    x = prior.sample(3, torch.Generator().manual_seed(34)).view(3, *shape)
    obs = ch.corrupt(x, sample_seeds(35, range(3)))
    ref_mean, ref_cov = posterior_moments(prior, ch, obs, shape)
    tol = 50 * _cond(prior, a, 0.05) * F32_EPS
    mean = posterior_mean(prior, ch, obs, shape, method="spectral")
    torch.testing.assert_close(mean.double(), ref_mean, atol=tol, rtol=tol)
    one = {k: v[:1] for k, v in obs.items()}
    _, cov = _linear_map(prior, ch, one, shape, "spectral")
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
    tol = 50 * _cond(prior, a, 0.1) * F32_EPS
    mean = posterior_mean(prior, ch, obs, (d,), method="shared")
    torch.testing.assert_close(mean.double(), ref_mean, atol=tol, rtol=tol)
    _, cov = _linear_map(prior, ch, {k: v[:1] for k, v in obs.items()}, (d,), "shared")
    torch.testing.assert_close(cov, ref_cov[0], atol=tol * float(ref_cov[0].diagonal().max()), rtol=0)
    with pytest.raises(ValueError, match="needs 'shared'"):
        posterior_mean(prior, ch, obs, (d,), method="diagonal")


def test_noiseless_blur_samples_reproduce_the_observation():
    shape = (3, 6, 6)
    ch = BlurChannel(sigma=1.0)
    basis, _ = _blur_basis(ch, shape)
    prior = spectral_prior(basis, 108, 3, seed=39)
    x = prior.sample(20, torch.Generator().manual_seed(40)).view(20, *shape)
    obs = ch.corrupt(x, sample_seeds(41, range(20)))
    xs = posterior_sample(prior, ch, obs, shape, torch.Generator().manual_seed(42))
    rel = float((ch.A(obs, xs) - obs["y"]).norm() / obs["y"].norm())
    assert rel < 1e-2, rel  # the jitter floor (1e-5 of the signal power) is the only slack
    again = posterior_sample(prior, ch, obs, shape, torch.Generator().manual_seed(43))
    assert float((xs - again).norm() / x.norm()) > 1e-3  # samples: the weakly seen frequencies vary


def test_stochastic_em_through_blur_fits_a_spectral_prior():
    """Blur observations of a known prior (decaying spectrum in the blur's eigenbasis plus rank 2):
    EM in eigen-coordinates returns a prior with that basis whose covariance is close to the data's."""
    shape = (1, 8, 8)
    ch = BlurChannel(sigma=0.7, noise_sigma=0.02)
    basis, _ = _blur_basis(ch, shape)
    truth = spectral_prior(basis, 64, 2, seed=43)
    x = truth.sample(6000, torch.Generator().manual_seed(44)).view(6000, *shape)
    obs = ch.corrupt(x, sample_seeds(45, range(6000)))
    prior = fit_gaussian(
        ch,
        _batches(obs, 2000),
        shape,
        iters=20,
        rank=2,
        generator=torch.Generator().manual_seed(46),
        full_max_dim=16,
    )
    assert prior.basis is not None and prior.factor.shape == (64, 2)
    emp = torch.cov(x.reshape(6000, -1).double().T)
    rel = torch.linalg.matrix_norm(prior.covariance() - emp) / torch.linalg.matrix_norm(emp)
    assert rel < 0.15, float(rel)
    assert (prior.mean - x.reshape(6000, -1).mean(0)).abs().max() < 0.1


def test_fit_on_a_strided_subset_and_a_device():
    """max_fit caps the observations the stochastic EM holds; device= gives the same prior, on the CPU."""
    d, r, n = 32, 3, 4000
    g = torch.Generator().manual_seed(47)
    truth = GaussianPrior(
        mean=torch.randn(d, generator=g), diag=torch.full((d,), 0.1), factor=torch.randn(d, r, generator=g)
    )
    x = truth.sample(n, torch.Generator().manual_seed(48))
    ch = Mask(rho=0.5, sigma=0.01)
    obs = ch.corrupt(x, sample_seeds(49, range(n)))
    kw = {"iters": 8, "full_max_dim": 16, "rank": r}
    sub = fit_gaussian(
        ch, _batches(obs, 700), (d,), max_fit=1000, generator=torch.Generator().manual_seed(1), **kw
    )
    again = fit_gaussian(
        ch,
        _batches(obs, 700),
        (d,),
        max_fit=1000,
        generator=torch.Generator().manual_seed(1),
        device=torch.device("cpu"),
        **kw,
    )
    torch.testing.assert_close(sub.covariance(), again.covariance())
    assert sub.mean.device.type == "cpu"
    emp_cov = torch.cov(x.double().T)
    rel = torch.linalg.matrix_norm(sub.covariance() - emp_cov) / torch.linalg.matrix_norm(emp_cov)
    assert rel < 0.2
    seen = []

    class Counting(Mask):
        def A(self, obs, x):
            seen.append(obs["y"].shape[0])
            return super().A(obs, x)

    fit_gaussian(Counting(rho=0.5, sigma=0.01), _batches(obs, 700), (d,), max_fit=1000, **kw)
    assert max(seen) == 1000  # strided: every 4th of 4000, across batches of 700


@pytest.mark.parametrize("kind", ["mask", "blur"])
def test_low_rank_start_is_batch_independent_and_on_the_cpu(kind):
    shape = (3, 4, 4)
    if kind == "mask":
        ch = MaskChannel(rho=0.5)
        prior = random_prior(48, rank=4, seed=50)
    else:
        ch = BlurChannel(sigma=0.8)
        prior = spectral_prior(_blur_basis(ch, shape)[0], 48, 4, seed=50)
    x = prior.sample(60, torch.Generator().manual_seed(51)).view(60, *shape)
    obs = ch.corrupt(x, sample_seeds(52, range(60)))
    a = torch.cat(list(gaussian_start(prior, ch, _batches(obs, 60), shape, seed=3)))
    b = torch.cat(
        list(gaussian_start(prior, ch, _batches(obs, 7), shape, seed=3, device=torch.device("cpu")))
    )
    assert a.shape == (60, *shape) and a.device.type == "cpu"
    # float32 products round differently with the batch size; the r x r solves (condition ~1e2
    # here: |F|^2 / D) amplify that: 1e2 * 1.2e-7, with a safety factor of 40
    torch.testing.assert_close(a, b, atol=5e-4, rtol=5e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device_matches_cpu():
    shape = (3, 4, 4)
    ch = MaskChannel(rho=0.5, sigma=0.01)
    x = random_prior(48, rank=4, seed=53).sample(500, torch.Generator().manual_seed(54)).view(500, *shape)
    obs = ch.corrupt(x, sample_seeds(55, range(500)))
    prior = fit_gaussian(ch, _batches(obs, 200), shape, iters=4, rank=4, device=torch.device("cuda"))
    assert prior.mean.device.type == "cpu"
    cpu = torch.cat(list(gaussian_start(prior, ch, _batches(obs, 200), shape, seed=1)))
    gpu = torch.cat(
        list(gaussian_start(prior, ch, _batches(obs, 200), shape, seed=1, device=torch.device("cuda")))
    )
    assert gpu.device.type == "cpu"
    torch.testing.assert_close(gpu, cpu, atol=1e-4, rtol=1e-4)


def test_basis_prior_round_trip(tmp_path):
    basis, _ = _blur_basis(BlurChannel(sigma=0.8), (2, 3, 3))
    prior = spectral_prior(basis, 18, 2, seed=56)
    path = tmp_path / "prior.safetensors"
    save_file(prior.to_tensors(), str(path))
    back = GaussianPrior.from_tensors(load_file(str(path)))
    torch.testing.assert_close(back.covariance(), prior.covariance())
    xs = back.sample(40000, torch.Generator().manual_seed(0)).double()
    scale = float(prior.covariance().diagonal().max())
    torch.testing.assert_close(torch.cov(xs.T), prior.covariance(), atol=0.05 * scale, rtol=0)
