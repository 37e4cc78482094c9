"""The residual around the Gaussian feature: a zero network is the closed-form denoiser."""

from __future__ import annotations

import pytest
import torch

from diffem_cli.diffusion.denoise import alpha_sigma, x0_from_v
from diffem_cli.diffusion.nets import build_network
from diffem_cli.diffusion.residual import GaussianResidual, zero_output
from diffem_cli.methods.testing import TINY_MLP as MLP
from diffem_cli.methods.testing import TINY_UNET as UNET


@pytest.mark.parametrize(("config", "shape"), [(UNET, (2, 8, 8)), (MLP, (3,))])
@pytest.mark.parametrize("t", [0, 250, 999])
def test_a_zero_network_is_the_posterior_mean_of_the_gaussian_residual(config, shape, t) -> None:
    sigma, n, c = 0.3, 4, shape[0]
    gen = torch.Generator().manual_seed(t)
    net = zero_output(build_network(config, shape, cond_size=c + 1))
    cond = torch.randn(n, c + 1, *shape[1:], generator=gen)  # one channel of the channel's, then m
    x_t = torch.randn(n, *shape, generator=gen)
    with torch.no_grad():
        v = GaussianResidual(net, c, sigma)(x_t, torch.tensor([t]), cond)
    a, s = alpha_sigma(t)
    got = x0_from_v(x_t.double(), v.double(), a, s)
    # x = m + sigma z, x_t = a x + s e: E[x | x_t] = m + cov(x, x_t) var(x_t)^-1 (x_t - a m), entry by entry
    m = cond[:, -c:].double()
    want = m + (a * sigma**2) / (a * a * sigma**2 + s * s) * (x_t.double() - a * m)
    # float32 arithmetic on values below 8: the v form divides by s and x0 multiplies it back, so
    # the error stays a few float32 roundings (2^-24 relative) of those values
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("config", "shape"), [(UNET, (2, 8, 8)), (MLP, (3,))])
def test_zero_output_zeroes_the_last_layer_only(config, shape) -> None:
    net = zero_output(build_network(config, shape, cond_size=0))
    x = torch.randn(3, *shape)
    assert torch.count_nonzero(net(x, torch.tensor([10]))) == 0
    assert any(p.abs().sum() > 0 for p in net.parameters())  # the rest keeps its initialisation


def test_the_residual_trains_and_moves_away_from_the_closed_form() -> None:
    from diffem_cli.diffusion.losses import VLoss
    from diffem_cli.diffusion.schedule import ddpm_scheduler

    shape, c = (3,), 3
    net = zero_output(build_network(MLP, shape, cond_size=c))
    loss = VLoss(around=lambda model: GaussianResidual(model, c, 0.5))
    gen = torch.Generator().manual_seed(0)
    batch = {"x": torch.randn(64, 3, generator=gen), "cond": torch.zeros(64, 3)}
    value = loss(net, batch, ddpm_scheduler(), gen)
    value.backward()
    last = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1]
    assert torch.isfinite(value) and last.weight.grad.abs().sum() > 0  # the zero layer gets a gradient
