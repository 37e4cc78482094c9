"""A network as a residual around a closed-form denoiser of ``x`` centred on a conditioning feature.

With a Gaussian posterior mean ``m`` of ``x`` given the observation among the conditioning (the
last ``C`` channels or features, see :mod:`diffem_cli.methods.conditioning`), model the clean data
as ``x = m + r`` with ``r ~ N(0, sigma^2 I)``. Under that model the denoiser of ``x_t = a x + s z``
is closed-form: ``base = m + g (x_t - a m)`` with ``g = a sigma^2 / (a^2 sigma^2 + s^2)``, and the
posterior standard deviation per entry is ``c = sigma s / sqrt(a^2 sigma^2 + s^2)``. The network's
output ``F`` then only corrects it: ``x0 = base - c F``, in v-prediction ``v = v_base + (c / s) F``.
A network whose output is zero is that closed-form denoiser, so a lap trained from scratch starts
where the Gaussian start already was (the preconditioning of Karras et al. 2022, centred on ``m``
instead of 0, with ``sigma`` the spread of ``x`` around ``m`` instead of the data's).
"""

from __future__ import annotations

import torch
from torch import nn

from diffem_cli.diffusion.denoise import alphas_cumprod


class GaussianResidual(nn.Module):
    """``module(x_t, t, cond) -> v`` of ``net`` as a residual around the closed-form denoiser of
    ``x = m + N(0, sigma^2)``, ``m = cond[:, -channels:]``. It holds no parameters of its own: the
    checkpoint stays ``net``'s, and ``sigma`` travels with the method's auxiliary tensors."""

    def __init__(self, net: nn.Module, channels: int, sigma: float):
        super().__init__()
        self.net, self.channels, self.sigma = net, int(channels), float(sigma)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        out = self.net(x, t, cond).float()
        abar = alphas_cumprod().to(x.device)[t.long()].float()
        abar = abar.view(-1, *([1] * (x.dim() - 1)))
        a, s, var = abar.sqrt(), (1 - abar).sqrt(), self.sigma**2
        m = cond[:, -self.channels :].float()
        xf = x.float()
        base = m + (a * var / (a * a * var + s * s)) * (xf - a * m)
        scale = self.sigma / (a * a * var + s * s).sqrt()
        return (a * xf - base) / s + scale * out


def zero_output(net: nn.Module) -> nn.Module:
    """``net`` with its last layer's weights and bias set to zero (it then outputs zeros), for a
    network trained as a residual from scratch: diffem's UNet (``unet.conv_out``) or MLP (last
    ``Linear``)."""
    unet = getattr(net, "unet", None)
    layer = unet.conv_out if unet is not None else [m for m in net.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        layer.weight.zero_()
        if layer.bias is not None:
            layer.bias.zero_()
    return net
