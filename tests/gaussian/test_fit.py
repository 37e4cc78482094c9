"""Lap 0: EM recovering a known Gaussian (exact and stochastic, in pixel coordinates and in a
blur's eigenbasis), restarts, strided subsets, and the Gaussian start's reproducibility, batch
independence and reuse of the fit's operator probe."""

from __future__ import annotations

import pytest
import torch
from gaussian_cases import Mask, Pick, Proj, Squash, batches, blur_basis, random_prior, spectral_prior

from diffem_channels.base import sample_seeds
from diffem_channels.blur import BlurChannel
from diffem_channels.mask import MaskChannel
from diffem_cli.core.errors import DiffemError
from diffem_cli.gaussian import fit as fit_module
from diffem_cli.gaussian.fit import fit_gaussian, gaussian_start
from diffem_cli.gaussian.posterior import posterior_mean
from diffem_cli.gaussian.prior import GaussianPrior
from diffem_cli.io.sources import load_source


def test_em_recovers_a_gaussian_from_random_projections():
    d, n = 3, 6000
    truth = random_prior(d, seed=11)
    ch = Proj(m=2, sigma=0.05)
    x = truth.sample(n, torch.Generator().manual_seed(12))
    obs = ch.corrupt(x, sample_seeds(13, range(n)))
    stats = []
    prior = fit_gaussian(ch, batches(obs, n), (d,), iters=30, progress=lambda i, t, s: stats.append(s))
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
    prior = fit_gaussian(channel, batches(obs, n), (d,), iters=25, progress=lambda i, t, s: stats.append(s))
    ll = [s["loglik"] for s in stats]
    assert all(b >= a - 1e-9 for a, b in zip(ll, ll[1:], strict=False))
    assert (prior.mean - x.double().mean(0)).abs().max() < 0.15


def test_em_restarts_from_init_and_converts_forms():
    d, n = 3, 2000
    truth = random_prior(d, seed=11)
    ch = Proj(m=2, sigma=0.05)
    obs = ch.corrupt(truth.sample(n, torch.Generator().manual_seed(12)), sample_seeds(13, range(n)))
    first = fit_gaussian(ch, batches(obs, 1000), (d,), iters=4)
    resumed = fit_gaussian(ch, batches(obs, 1000), (d,), iters=4, init=first)
    straight = fit_gaussian(ch, batches(obs, 1000), (d,), iters=8)
    torch.testing.assert_close(resumed.cov, straight.cov)
    low = fit_gaussian(ch, batches(obs, 1000), (d,), iters=1, full_max_dim=2, rank=2, init=first)
    assert not low.full and low.factor.shape == (d, 2)


def test_stochastic_em_fits_low_rank_plus_diagonal():
    d, r, n = 32, 3, 4000
    g = torch.Generator().manual_seed(20)
    factor = torch.randn(d, r, generator=g)
    truth = GaussianPrior(mean=torch.randn(d, generator=g), diag=torch.full((d,), 0.1), factor=factor)
    x = truth.sample(n, torch.Generator().manual_seed(21))
    ch = Mask(rho=0.5, sigma=0.01)
    obs = ch.corrupt(x, sample_seeds(22, range(n)))
    prior = fit_gaussian(ch, batches(obs, n), (d,), iters=8, full_max_dim=16, rank=r)
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
    a = torch.cat(list(gaussian_start(prior, ch, batches(obs, 50), (d,), seed=3)))
    b = torch.cat(list(gaussian_start(prior, ch, batches(obs, 7)(), (d,), seed=3)))
    c = torch.cat(list(gaussian_start(prior, ch, batches(obs, 50), (d,), seed=4)))
    assert a.shape == (n, d)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert (a - c).abs().max() > 0.1


def test_the_residual_is_cosine_on_images_and_per_pixel_on_vectors_by_default(monkeypatch):
    """``residual="auto"``: a low-rank fit of images keeps its residual diagonal in each colour
    channel's cosine basis, of vectors per coordinate; ``cosine`` on vectors and an unknown name are
    refused in one line."""
    from diffem_cli.gaussian.cosine import cosine_basis

    shape = (3, 4, 4)
    ch = MaskChannel(rho=0.5, sigma=0.01)
    x = random_prior(48, rank=4, seed=60).sample(200, torch.Generator().manual_seed(61)).view(200, *shape)
    obs = ch.corrupt(x, sample_seeds(62, range(200)))
    kw = dict(iters=2, rank=4, full_max_dim=0)
    torch.testing.assert_close(fit_gaussian(ch, batches(obs, 200), shape, **kw).basis, cosine_basis(4, 4))
    assert fit_gaussian(ch, batches(obs, 200), shape, residual="pixel", **kw).basis is None
    vec = Mask(rho=0.5, sigma=0.01)
    flat = vec.corrupt(x.reshape(200, -1), sample_seeds(62, range(200)))
    assert fit_gaussian(vec, batches(flat, 200), (48,), **kw).basis is None
    with pytest.raises(DiffemError, match=r"cosine residual needs images \(C, H, W\)"):
        fit_gaussian(vec, batches(flat, 200), (48,), residual="cosine", **kw)
    with pytest.raises(DiffemError, match="unknown Gaussian residual 'dct'"):
        fit_gaussian(ch, batches(obs, 200), shape, residual="dct", **kw)
    # a full covariance starts from a low-rank fit whose residual stays per pixel whatever is asked
    monkeypatch.setattr(fit_module, "WARM_FULL_DIM", 16)
    fulls = [
        fit_gaussian(ch, batches(obs, 200), shape, iters=4, rank=4, full_max_dim=48, residual=r).cov
        for r in ("pixel", "cosine")
    ]
    torch.testing.assert_close(fulls[0], fulls[1], atol=0, rtol=0)
    # the dense basis bounds the image size: auto stops at 32x32, an explicit cosine at 64x64
    big = ch.corrupt(torch.randn(8, 1, 33, 33), sample_seeds(63, range(8)))
    assert fit_gaussian(ch, batches(big, 8), (1, 33, 33), **kw).basis is None
    huge = ch.corrupt(torch.zeros(2, 1, 65, 65), sample_seeds(64, range(2)))
    with pytest.raises(DiffemError, match="at most 4096 pixels per channel, got 65x65"):
        fit_gaussian(ch, batches(huge, 2), (1, 65, 65), residual="cosine", **kw)


def test_non_linear_channel_is_refused():
    obs = {"y": torch.zeros(2, 3)}
    with pytest.raises(DiffemError, match="no linear form"):
        fit_gaussian(Squash(), lambda: [obs], (3,))


def test_exact_em_through_blur_fits_a_spectral_prior():
    """Blur observations of a known prior (decaying spectrum in the blur's eigenbasis plus rank 2):
    exact EM in eigen-coordinates raises the likelihood at every step and returns a prior with that
    basis whose covariance is close to the data's."""
    shape = (1, 8, 8)
    ch = BlurChannel(sigma=0.7, noise_sigma=0.02)
    basis, _ = blur_basis(ch, shape)
    truth = spectral_prior(basis, 64, 2, seed=43)
    x = truth.sample(6000, torch.Generator().manual_seed(44)).view(6000, *shape)
    obs = ch.corrupt(x, sample_seeds(45, range(6000)))
    stats = []
    prior = fit_gaussian(
        ch,
        batches(obs, 2000),
        shape,
        iters=20,
        rank=2,
        full_max_dim=16,
        progress=lambda i, t, s: stats.append(s["loglik"]),
    )
    assert prior.basis is not None and prior.factor.shape == (64, 2)
    assert all(b >= a - 1e-9 * abs(a) for a, b in zip(stats, stats[1:], strict=False))
    emp = torch.cov(x.reshape(6000, -1).double().T)
    rel = torch.linalg.matrix_norm(prior.covariance() - emp) / torch.linalg.matrix_norm(emp)
    assert rel < 0.15, float(rel)
    assert (prior.mean - x.reshape(6000, -1).mean(0)).abs().max() < 0.1


@pytest.mark.parametrize(
    ("spec", "noise"),
    [
        ("patches:size=16,n=384,seed=0", 0.05),
        ("patches:size=16,n=384,seed=0", 0.0),
        ("digits", 0.05),
        ("digits", 0.0),
    ],
)
def test_blur_start_beats_the_observations_and_stays_in_range(spec, noise):
    """On real images behind a blur, the start's posterior mean is closer to the clean images than
    the blurred observations are, and its samples stay near the data range [-1, 1]."""
    clean = load_source(spec, limit=384).read(0, 384)
    shape = tuple(clean.shape[1:])
    ch = BlurChannel(sigma=1.5 if shape[0] == 3 else 1.0, noise_sigma=noise)
    obs = ch.corrupt(clean, sample_seeds(0, range(len(clean))))
    prior = fit_gaussian(ch, batches(obs, 128), shape, iters=8)
    mean = posterior_mean(prior, ch, obs, shape)
    start = torch.cat(list(gaussian_start(prior, ch, batches(obs, 128), shape, seed=1)))

    def mse(x):
        return float((x - clean).square().mean())

    assert mse(mean.clamp(-1, 1)) < mse(obs["y"].view_as(clean))
    assert float(start.abs().max()) < 3.0


def test_full_covariance_above_the_warm_dimension_refines_the_low_rank_fit(monkeypatch):
    """Above ``WARM_FULL_DIM`` a full-covariance fit is the low-rank fit refined by exact EM: its
    log-likelihood rises at each refinement step and ends above the low-rank fit's; a blur keeps
    its spectral fit, which is exact already."""
    monkeypatch.setattr(fit_module, "WARM_FULL_DIM", 8)
    d, n = 12, 3000
    truth = random_prior(d, seed=21)
    x = truth.sample(n, torch.Generator().manual_seed(22))
    ch = Mask(rho=0.5, sigma=0.05)
    obs = ch.corrupt(x, sample_seeds(23, range(n)))
    stats = []
    full = fit_gaussian(
        ch,
        batches(obs, 1000),
        (d,),
        iters=16,
        rank=2,
        full_max_dim=16,
        progress=lambda i, t, s: stats.append(s["loglik"]),
    )
    assert full.full and len(stats) == 4
    assert all(b >= a - 1e-9 * abs(a) for a, b in zip(stats, stats[1:], strict=False))
    low = fit_gaussian(ch, batches(obs, 1000), (d,), iters=16, rank=2, full_max_dim=8)
    after_low = []
    fit_gaussian(
        ch,
        batches(obs, 1000),
        (d,),
        iters=1,
        full_max_dim=16,
        init=low,
        progress=lambda i, t, s: after_low.append(s["loglik"]),
    )
    assert stats[0] == pytest.approx(after_low[0], rel=1e-9)  # the refinement starts from the low-rank fit
    shape = (1, 4, 4)
    blur = BlurChannel(sigma=0.7, noise_sigma=0.02)
    xb = torch.randn(500, *shape, generator=torch.Generator().manual_seed(24))
    obs_b = blur.corrupt(xb, sample_seeds(25, range(500)))
    spectral = fit_gaussian(blur, batches(obs_b, 500), shape, iters=4, rank=2, full_max_dim=16)
    assert not spectral.full and spectral.basis is not None


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
        ch, batches(obs, 700), (d,), max_fit=1000, generator=torch.Generator().manual_seed(1), **kw
    )
    again = fit_gaussian(
        ch,
        batches(obs, 700),
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

    fit_gaussian(Counting(rho=0.5, sigma=0.01), batches(obs, 700), (d,), max_fit=1000, **kw)
    assert max(seen) == 1000  # strided: every 4th of 4000, across batches of 700


@pytest.mark.parametrize("kind", ["mask", "blur"])
def test_low_rank_start_is_batch_independent_and_on_the_cpu(kind):
    shape = (3, 4, 4)
    if kind == "mask":
        ch = MaskChannel(rho=0.5)
        prior = random_prior(48, rank=4, seed=50)
    else:
        ch = BlurChannel(sigma=0.8)
        prior = spectral_prior(blur_basis(ch, shape)[0], 48, 4, seed=50)
    x = prior.sample(60, torch.Generator().manual_seed(51)).view(60, *shape)
    obs = ch.corrupt(x, sample_seeds(52, range(60)))
    a = torch.cat(list(gaussian_start(prior, ch, batches(obs, 60), shape, seed=3)))
    b = torch.cat(list(gaussian_start(prior, ch, batches(obs, 7), shape, seed=3, device=torch.device("cpu"))))
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
    prior = fit_gaussian(ch, batches(obs, 200), shape, iters=4, rank=4, device=torch.device("cuda"))
    assert prior.mean.device.type == "cpu"
    cpu = torch.cat(list(gaussian_start(prior, ch, batches(obs, 200), shape, seed=1)))
    gpu = torch.cat(
        list(gaussian_start(prior, ch, batches(obs, 200), shape, seed=1, device=torch.device("cuda")))
    )
    assert gpu.device.type == "cpu"
    torch.testing.assert_close(gpu, cpu, atol=1e-4, rtol=1e-4)


def test_gaussian_start_reuses_the_operator_the_fit_probed(monkeypatch):
    """The fitted prior hands its probe to the start explicitly: no second probe, and the same
    samples as a prior without it, which probes the channel afresh."""
    shape = (1, 6, 6)
    ch = BlurChannel(sigma=0.8, noise_sigma=0.05)
    truth = spectral_prior(blur_basis(ch, shape)[0], 36, 2, seed=60)
    obs = ch.corrupt(
        truth.sample(80, torch.Generator().manual_seed(61)).view(80, *shape), sample_seeds(62, range(80))
    )
    prior = fit_gaussian(ch, batches(obs, 40), shape, iters=2, full_max_dim=16, rank=2)
    assert prior.probed is not None and prior.probed.operator.kind == "symmetric"
    fresh = torch.cat(
        list(
            gaussian_start(
                GaussianPrior.from_tensors(prior.to_tensors()), ch, batches(obs, 40), shape, seed=5
            )
        )
    )
    calls = []
    original = fit_module.classify
    monkeypatch.setattr(fit_module, "classify", lambda *a, **k: calls.append(1) or original(*a, **k))
    reused = torch.cat(list(gaussian_start(prior, ch, batches(obs, 40), shape, seed=5)))
    assert calls == []
    # the same operator rows (read off the same channel on the same first observation): the same arithmetic
    assert torch.equal(reused, fresh)


def test_split_folds_holds_out_every_kth_observation_across_batches():
    x = torch.arange(23, dtype=torch.float32)[:, None].repeat(1, 4)
    obs = Mask(rho=0.5).corrupt(x, sample_seeds(0, range(23)))
    kept, held = fit_module.split_folds(batches(obs, 5), 5)
    held_rows = torch.cat([o["y"] for o in held()] + [torch.empty(0, 4)])
    kept_rows = torch.cat([o["mask"] for o in kept()])
    assert torch.equal(held_rows, obs["y"][::5])
    keep = torch.arange(23) % 5 != 0
    assert torch.equal(kept_rows, obs["mask"][keep])


def test_the_held_out_likelihood_is_the_marginal_of_the_observed_entries():
    d, n, s = 5, 7, 0.1
    prior = random_prior(d, seed=3)
    ch = Mask(rho=0.4, sigma=s)
    x = prior.sample(n, torch.Generator().manual_seed(4))
    obs = ch.corrupt(x, sample_seeds(5, range(n)))
    rows = fit_module._row_batches(ch, batches(obs, 3), (d,), 2**20)
    got = fit_module._mean_loglik(prior, rows, jitter=0.0)
    want = 0.0
    for i in range(n):
        o = obs["mask"][i].bool()
        cov = prior.covariance()[o][:, o] + s * s * torch.eye(int(o.sum()), dtype=torch.float64)
        dist = torch.distributions.MultivariateNormal(prior.mean[o], covariance_matrix=cov)
        want += float(dist.log_prob(obs["y"][i][o].double()))
    # float64 throughout on 5x5 systems: rounding far below 1e-9 of a log-likelihood of order 10
    assert got == pytest.approx(want / n, rel=1e-9, abs=1e-9)


def _stationary_images(n: int, side: int, seed: int) -> torch.Tensor:
    from diffem_cli.gaussian.cosine import cosine_1d

    f = torch.arange(side, dtype=torch.float64)
    scale = (1.0 / (1.0 + f[:, None] ** 2 + f[None, :] ** 2)).reshape(-1).sqrt()
    z = torch.randn(n, side * side, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    basis = torch.kron(cosine_1d(side), cosine_1d(side))
    return ((z * scale) @ basis.T).float().reshape(n, 1, side, side)


def test_shrinking_a_prior_moves_a_full_covariance_only():
    from diffem_cli.gaussian.shrinkage import shrink_prior, shrinkage_target, shrunk

    x = _stationary_images(60, 4, 0)
    obs = Mask(rho=0.3).corrupt(x, sample_seeds(1, range(60)))
    plain = fit_gaussian(Mask(rho=0.3), batches(obs, 60), (1, 4, 4), iters=4)
    half = shrink_prior(plain, (1, 4, 4), 0.5)
    assert torch.equal(half.cov, shrunk(plain.cov, shrinkage_target(plain.cov, (1, 4, 4)), 0.5))
    assert torch.equal(half.mean, plain.mean) and shrink_prior(plain, (1, 4, 4), 0.0) is plain
    low = fit_gaussian(Mask(rho=0.3), batches(obs, 60), (1, 4, 4), iters=2, full_max_dim=8, rank=2)
    assert not low.full and shrink_prior(low, (1, 4, 4), 0.5) is low


def test_cross_validation_shrinks_a_start_from_few_stationary_images_hard():
    # 64 masked images in 64 dimensions for each fit: the full covariance cannot be estimated,
    # and the target is the true (stationary) structure
    n, shape = 80, (1, 8, 8)
    x = _stationary_images(n, 8, 2)
    ch = Mask(rho=0.5)
    obs = ch.corrupt(x, sample_seeds(3, range(n)))

    def fit(b):
        return fit_gaussian(ch, b, shape, iters=8)

    assert fit_module.choose_start_shrinkage(ch, batches(obs, 32), shape, fit) >= 0.5


def test_cross_validation_keeps_the_covariance_of_many_non_stationary_images():
    # independent pixels with standard deviations from 0.05 to 1: the stationary target evens the
    # variances out, far from the truth; 40 observations per dimension fit the covariance well
    n, shape = 640, (1, 4, 4)
    std = torch.linspace(0.05, 1.0, 16)
    x = (torch.randn(n, 16, generator=torch.Generator().manual_seed(4)) * std).reshape(n, *shape)
    ch = Mask(rho=0.3, sigma=0.01)
    obs = ch.corrupt(x, sample_seeds(5, range(n)))

    def fit(b):
        return fit_gaussian(ch, b, shape, iters=16)

    assert fit_module.choose_start_shrinkage(ch, batches(obs, 128), shape, fit) <= 0.05
