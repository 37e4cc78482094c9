"""The v-parameterisation in one place: ``x0 = alpha_t x_t - sigma_t v`` inverts ``v = alpha_t z -
sigma_t x0`` for ``x_t = alpha_t x0 + sigma_t z``, and the network denoiser uses exactly it."""

import torch
from helpers import OracleV

from diffem_cli.diffusion.denoise import Denoiser, NetworkDenoiser, alpha_sigma, x0_from_v


def test_x0_from_v_inverts_the_v_target():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 3, dtype=torch.float64, generator=g)
    z = torch.randn(6, 3, dtype=torch.float64, generator=g)
    for t in (0, 123, 500, 999):
        a, s = alpha_sigma(t)
        x_t = a * x0 + s * z
        v = a * z - s * x0
        # alpha^2 + sigma^2 = 1 in float64; terms of size <~ 5: rounding ~1e-15
        assert torch.allclose(x0_from_v(x_t, v, a, s), x0, atol=1e-12)


def test_x0_from_v_broadcasts_per_sample_coefficients():
    ts = torch.tensor([10, 400, 990])
    abar = torch.tensor([alpha_sigma(int(t))[0] ** 2 for t in ts], dtype=torch.float64).view(-1, 1, 1, 1)
    a, s = abar.sqrt(), (1 - abar).sqrt()
    x_t = torch.randn(3, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    v = torch.randn(3, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    rows = [x0_from_v(x_t[i], v[i], float(a[i]), float(s[i])) for i in range(3)]
    assert torch.equal(x0_from_v(x_t, v, a, s), torch.stack(rows))


def test_network_denoiser_and_base_v_agree_with_x0_from_v():
    mu = torch.tensor([0.3, -0.8])
    den = NetworkDenoiser(OracleV(mu))
    x_t = torch.randn(4, 2, generator=torch.Generator().manual_seed(3))
    t = 300
    a, s = alpha_sigma(t)
    assert torch.equal(den(x_t, t), x0_from_v(x_t, den.v(x_t, t), a, s))

    class Plain(Denoiser):  # the base class's v, from an x0 estimate
        def __call__(self, x: torch.Tensor, t: int) -> torch.Tensor:
            return den(x, t)

    # v -> x0 -> v round trip in float32 with terms of size <~ 3 / sigma: a few ulps
    assert torch.allclose(Plain().v(x_t, t), den.v(x_t, t), atol=1e-5)
