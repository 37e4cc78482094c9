"""Posterior guidance against closed forms: with a Gaussian prior, MMPS is exact."""

import torch

from diffem_channels import sample_seeds
from diffem_channels.mask import MaskChannel
from diffem_channels.projection import ProjectionChannel
from diffem_cli.diffusion.denoise import Denoiser, alpha_sigma
from diffem_cli.diffusion.sampling import sample_loop
from diffem_cli.gaussian.linalg import conjugate_gradient
from diffem_cli.methods.guidance import ALPHA_MIN, MMPSDenoiser

D = 4


def _prior() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(D, generator=g, dtype=torch.float64)
    L = torch.randn(D, D, generator=g, dtype=torch.float64) * 0.5
    return mu, L @ L.T + 0.2 * torch.eye(D, dtype=torch.float64)


class GaussianDenoiser(Denoiser):
    """The exact Tweedie mean E[x | x_t] of the prior N(mu, S), written with autograd-able ops."""

    def __init__(self, mu: torch.Tensor, cov: torch.Tensor):
        self.mu, self.cov = mu.float(), cov.float()

    def __call__(self, x_t, t):
        a, s = alpha_sigma(t)
        gain = a * self.cov @ torch.linalg.inv(a * a * self.cov + s * s * torch.eye(D))
        return self.mu + (x_t - a * self.mu) @ gain.T


def test_cg_solves_spd_systems_per_sample():
    g = torch.Generator().manual_seed(1)
    M = torch.randn(3, 5, 5, generator=g)
    M = M @ M.transpose(1, 2) + 5 * torch.eye(5)
    b = torch.randn(3, 5, generator=g)
    u = conjugate_gradient(lambda v: torch.einsum("bij,bj->bi", M, v), b, iters=5)
    # CG is exact after n = 5 iterations up to float32 rounding of a system with condition
    # number < 10: residual ~ 1e-6 relative
    assert torch.allclose(torch.einsum("bij,bj->bi", M, u), b, atol=1e-4)


def test_mmps_is_the_exact_posterior_mean_for_a_gaussian_prior():
    mu, cov = _prior()
    channel = ProjectionChannel(m=2, sigma=0.1)
    x = mu.float() + torch.randn(6, D, generator=torch.Generator().manual_seed(2))
    obs = channel.corrupt(x, sample_seeds(0, range(6)))
    for t in (100, 500, 900):
        a, s = alpha_sigma(t)
        assert a > ALPHA_MIN
        x_t = a * x + s * torch.randn(6, D, generator=torch.Generator().manual_seed(t))
        got = MMPSDenoiser(GaussianDenoiser(mu, cov), channel, obs, cg_iters=2)(x_t, t)
        # closed form: x | (x_t, y) with x_t = a x + s z and y = A x + 0.1 n, in float64
        for i in range(6):
            H = torch.cat([a * torch.eye(D, dtype=torch.float64), obs["A"][i].double()])
            R = torch.diag(torch.tensor([s * s] * D + [0.01] * 2, dtype=torch.float64))
            z = torch.cat([x_t[i].double(), obs["y"][i].double()])
            want = mu + cov @ H.T @ torch.linalg.solve(H @ cov @ H.T + R, z - H @ mu)
            # float32 Tweedie mean and VJPs through a 4x4 inverse of condition < 1e3: ~1e-4
            assert torch.allclose(got[i].double(), want, atol=2e-3), (t, i)


def test_mmps_sampling_draws_the_exact_gaussian_posterior():
    """DDPM with the MMPS denoiser samples N(posterior mean, posterior cov) for a Gaussian prior."""
    mu, cov = _prior()
    channel = MaskChannel(rho=0.5, sigma=0.1)
    x = (mu + torch.linalg.cholesky(cov) @ torch.randn(D, dtype=torch.float64)).float()
    x = x.view(1, 1, 2, 2)
    obs1 = channel.corrupt(x, sample_seeds(3, [0]))
    n = 4000
    obs = {k: v.expand(n, *v.shape[1:]).contiguous() for k, v in obs1.items()}

    class Flat(Denoiser):
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, x_t, t):
            return self.inner(x_t.reshape(-1, D), t).reshape(x_t.shape)

    den = MMPSDenoiser(Flat(GaussianDenoiser(mu, cov)), channel, obs, cg_iters=D)
    noise = torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(5))
    samples = sample_loop(den, noise, sampler="ddpm", steps=200, generator=torch.Generator().manual_seed(6))
    s = samples.reshape(n, D).double()
    m = obs1["mask"].reshape(D).double() if "mask" in obs1 else None
    keep = torch.nonzero(m).flatten()
    A = torch.eye(D, dtype=torch.float64)[keep] if m is not None else torch.eye(D, dtype=torch.float64)
    y = obs1["y"].reshape(D).double()[keep]
    gain = cov @ A.T @ torch.linalg.inv(A @ cov @ A.T + 0.01 * torch.eye(len(keep), dtype=torch.float64))
    want_mean = mu + gain @ (y - A @ mu)
    want_cov = cov - gain @ A @ cov
    # Monte-Carlo error of a mean over n = 4000 samples: 4 standard errors sqrt(var / n), plus the
    # discretisation of 200 DDPM steps (a few 1e-3)
    se = (want_cov.diagonal().clamp_min(0) / n).sqrt()
    assert ((s.mean(0) - want_mean).abs() <= 4 * se + 1e-2).all()
    emp = torch.cov(s.T)
    assert torch.allclose(emp, want_cov, atol=0.05 * float(cov.diagonal().max()) + 0.01)


def test_mmps_with_the_gaussian_covariance_is_exact_for_that_gaussian():
    """The heuristic's covariance is the true Cov[x | x_t] when the prior is the fitted Gaussian."""
    from diffem_cli.gaussian.moments import GaussianCovariance
    from diffem_cli.gaussian.prior import GaussianPrior

    mu, cov = _prior()
    channel = ProjectionChannel(m=2, sigma=0.1)
    x = mu.float() + torch.randn(6, D, generator=torch.Generator().manual_seed(2))
    obs = channel.corrupt(x, sample_seeds(0, range(6)))
    heuristic = GaussianCovariance(GaussianPrior(mean=mu, cov=cov))
    for t in (100, 500, 900):
        a, s = alpha_sigma(t)
        x_t = a * x + s * torch.randn(6, D, generator=torch.Generator().manual_seed(t))
        exact = MMPSDenoiser(GaussianDenoiser(mu, cov), channel, obs, cg_iters=2)(x_t, t)
        got = MMPSDenoiser(GaussianDenoiser(mu, cov), channel, obs, cg_iters=2, covariance=heuristic)(x_t, t)
        # both solve the same 2x2 systems exactly; float32 VJPs through a 4x4 inverse: ~1e-4
        assert torch.allclose(got, exact, atol=2e-3), t


def test_predictor_corrector_sampling_keeps_the_gaussian_prior():
    """DDIM plus one Langevin correction per step, exact Gaussian denoiser: samples N(mu, cov)."""
    mu, cov = _prior()
    n = 4000
    noise = torch.randn(n, D, generator=torch.Generator().manual_seed(7))
    samples = sample_loop(
        GaussianDenoiser(mu, cov),
        noise,
        sampler="ddim",
        steps=64,
        generator=torch.Generator().manual_seed(8),
        corrections=1,
    ).double()
    # Monte-Carlo error of n = 4000 samples (4 standard errors) plus the 64-step discretisation
    se = (cov.diagonal() / n).sqrt()
    assert ((samples.mean(0) - mu).abs() <= 4 * se + 1e-2).all()
    assert torch.allclose(torch.cov(samples.T), cov, atol=0.05 * float(cov.diagonal().max()) + 0.01)
