"""The one sampling loop: every sampler on the denoiser seam, clipping, seeding, batching."""

import pytest
import torch
from helpers import OracleV

from diffem_cli.core.errors import DiffemError
from diffem_cli.diffusion.denoise import NetworkDenoiser, alpha_sigma
from diffem_cli.diffusion.sampling import draw, sample_loop
from diffem_cli.diffusion.schedule import SAMPLERS, sampler_scheduler


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_network_denoiser_inverts_the_v_parameterisation():
    mu = torch.tensor([0.7, -1.2])
    den = NetworkDenoiser(OracleV(mu))
    for t in (0, 250, 600, 999):
        a, s = alpha_sigma(t)
        x_t = a * mu + s * torch.randn(5, 2, generator=_gen(t))
        # x0 = alpha x_t - sigma v is exact for the point-mass oracle, up to float32 rounding of
        # terms of size |x_t| / sigma <= 1e2 (at t = 0): a few ulps of 1e2 ~ 1e-4.
        assert torch.allclose(den(x_t, t), mu.expand(5, 2), atol=1e-3)
        assert torch.allclose(den.v(x_t, t), OracleV(mu)(x_t, torch.tensor([t])), atol=1e-5)


@pytest.mark.parametrize("name", SAMPLERS)
def test_samplers_recover_a_point_mass(name):
    mu = torch.tensor([1.5, -0.5, 0.25])
    noise = torch.randn(8, 3, generator=_gen())
    x = sample_loop(NetworkDenoiser(OracleV(mu)), noise, sampler=name, steps=20, generator=_gen(1))
    assert x.shape == (8, 3)
    # the last step leaves at most sigma at the smallest trailing timestep of noise: < 2e-2
    assert torch.allclose(x, mu.expand(8, 3), atol=2e-2)


@pytest.mark.parametrize("name", SAMPLERS)
def test_every_sampler_clips_x0_the_same_way(name):
    mu = torch.tensor([3.0, -4.0])  # outside the data range [-1, 1]
    noise = torch.randn(6, 2, generator=_gen())
    x = sample_loop(
        NetworkDenoiser(OracleV(mu)), noise, sampler=name, steps=16, generator=_gen(2), clip_range=1.0
    )
    target = torch.tensor([1.0, -1.0]).expand(6, 2)
    assert torch.allclose(x, target, atol=2e-2)
    unclipped = sample_loop(NetworkDenoiser(OracleV(mu)), noise, sampler=name, steps=16, generator=_gen(2))
    assert torch.allclose(unclipped, mu.expand(6, 2), atol=5e-2)


def test_steps_are_network_evaluations():
    calls = []

    class Counting(OracleV):
        def forward(self, x, t, cond=None):
            calls.append(int(t[0]))
            return super().forward(x, t, cond)

    sample_loop(NetworkDenoiser(Counting(torch.zeros(2))), torch.randn(2, 2), sampler="dpm++", steps=12)
    assert len(calls) == 12
    assert calls[0] == 999
    calls.clear()  # one Langevin correction after every step but the last, at the new timestep
    sample_loop(
        NetworkDenoiser(Counting(torch.zeros(2))), torch.randn(2, 2), sampler="ddim", steps=12, corrections=1
    )
    assert len(calls) == 12 + 11 and calls[1] == calls[2] < calls[0]


def test_gradients_only_when_the_denoiser_asks():
    seen = []

    class Probe(NetworkDenoiser):
        def __call__(self, x_t, t):
            seen.append(torch.is_grad_enabled())
            return super().__call__(x_t, t)

    den = Probe(OracleV(torch.zeros(2)))
    sample_loop(den, torch.randn(2, 2), sampler="ddim", steps=3)
    den.needs_grad = True
    sample_loop(den, torch.randn(2, 2), sampler="ddim", steps=3)
    assert seen == [False] * 3 + [True] * 3


def test_draw_is_seeded_per_batch_and_independent_of_batching():
    den = NetworkDenoiser(OracleV(torch.zeros(3)))
    kw = dict(sampler="ddpm", steps=5, seed_parts=(4, 2), device=torch.device("cpu"))
    a = draw(lambda s, e: den, 12, (3,), batch_size=4, **kw)
    b = draw(lambda s, e: den, 12, (3,), batch_size=4, **kw)
    assert torch.equal(a, b)
    # batch b's noise depends on (seed parts, first index) only: the first batch of 4 is the same
    # whether 12 or 4 samples are drawn
    c = draw(lambda s, e: den, 4, (3,), batch_size=4, **kw)
    assert torch.equal(a[:4], c)
    rows = []
    draw(lambda s, e: rows.append((s, e)) or den, 10, (3,), batch_size=4, **kw)
    assert rows == [(0, 4), (4, 8), (8, 10)]


def test_bad_sampler_and_steps():
    with pytest.raises(DiffemError, match="unknown sampler"):
        sampler_scheduler("euler-magic", 10)
    with pytest.raises(DiffemError, match="steps"):
        sampler_scheduler("ddim", 0)


@pytest.mark.parametrize("name", ["dpm++", "ddpm"])
def test_linspace_spacing_ends_at_the_smallest_noise_level(name):
    calls = []

    class Counting(OracleV):
        def forward(self, x, t, cond=None):
            calls.append(int(t[0]))
            return super().forward(x, t, cond)

    mu = torch.tensor([1.5, -0.5, 0.25])
    noise = torch.randn(8, 3, generator=_gen())
    x = sample_loop(
        NetworkDenoiser(Counting(mu)), noise, sampler=name, steps=6, generator=_gen(1), spacing="linspace"
    )
    assert calls == sorted(calls, reverse=True) and len(calls) == 6 and (calls[0], calls[-1]) == (999, 0)
    # what the last step can leave is the noise at step 0, sigma_0 times a normal: under 5 sigma_0
    assert torch.allclose(x, mu.expand(8, 3), atol=5 * alpha_sigma(0)[1])
    calls.clear()
    sample_loop(NetworkDenoiser(Counting(mu)), noise, sampler=name, steps=1, spacing="linspace")
    assert calls == [999]  # one step starts from pure noise


def test_bad_spacing():
    with pytest.raises(DiffemError, match="spacing"):
        sampler_scheduler("dpm++", 10, "karras")
    with pytest.raises(DiffemError, match="linspace"):
        sampler_scheduler("ddim", 10, "linspace")
