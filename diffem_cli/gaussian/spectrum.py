"""A power-law spectrum for image priors in an operator's eigenbasis: the variances EM cannot learn.

Through a blur, EM on moments only learns the variance of the directions the operator passes;
a direction it barely passes keeps whatever variance the initial prior gave it, and an isotropic
start gives the high frequencies of natural images tens to hundreds of times their true
variance, which the posterior then fills with noise. Natural images are close to stationary with
a power spectrum falling as a power of the spatial frequency, so the initial variance of each
eigen-direction is set from a spectrum ``g(w) = exp(a_c) (w^2 + w0^2)^-alpha`` (per colour
channel ``c``) fitted by maximum marginal likelihood to the observations: the well observed
directions fix its parameters, and it extrapolates to the barely observed ones.

The frequency of an eigenvector is its Dirichlet energy on the pixel grid (the sum of squared
differences of horizontal and vertical neighbours), exact for the cosine basis of a
reflect-padded blur and meaningful for any basis.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_F64 = torch.float64
FIT_STEPS = 200  # L-BFGS iterations on a handful of parameters
LN2 = math.log(2.0)


def grid_frequencies(basis: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Squared spatial frequency of each column of ``basis`` ``(k, k)``, its Dirichlet energy on
    the ``(H, W)`` grid of ``shape`` ``(C, H, W)`` (``k`` is ``H W`` or ``C H W``)."""
    _, h, w = shape
    k = basis.shape[0]
    planes = basis.T.to(_F64).reshape(k, -1, h, w)
    dy = planes[..., 1:, :] - planes[..., :-1, :]
    dx = planes[..., :, 1:] - planes[..., :, :-1]
    return dy.square().sum((1, 2, 3)) + dx.square().sum((1, 2, 3))


def fit_power_spectrum(energy: Tensor, gain: Tensor, freq: Tensor, noise_var: float, colours: int) -> Tensor:
    """Variances ``g`` per coordinate maximising the Gaussian marginal likelihood of observations
    whose centred energy per coordinate is ``energy`` ``(D,)``, seen at ``gain`` ``(D,)`` with
    noise variance ``noise_var``: each coordinate's observation has variance
    ``gain^2 g + noise_var``. ``freq`` ``(D,)`` is each coordinate's squared frequency; the
    ``D`` coordinates are ``colours`` consecutive blocks, one amplitude per block."""
    e = energy.to(_F64).view(colours, -1)
    g2 = gain.to(_F64).square().view(colours, -1)
    f = freq.to(_F64).view(colours, -1)
    positive = f[f > 0]
    f0 = float(positive.min()) if positive.numel() else 1.0
    # start: alpha = 1 (a 1/f^2 power spectrum), amplitude from the best observed coordinates
    informative = g2 >= 0.5 * g2.max()
    guess = ((e - noise_var).clamp_min(1e-12) / g2.clamp_min(1e-12) * (f + f0)).where(informative, 0.0)
    amp = (guess.sum(1) / informative.sum(1).clamp_min(1)).clamp_min(1e-12).log()
    params = torch.cat([amp, torch.tensor([0.0, math.log(f0)], dtype=_F64)])
    params.requires_grad_(True)
    floor = max(noise_var, 1e-12 * float(e.mean().clamp_min(1e-30)))

    def spectrum(p: Tensor) -> Tensor:
        alpha = torch.nn.functional.softplus(p[-2]) / LN2  # alpha = 1 at p = 0, always positive
        return (p[:colours, None] - alpha * (f + p[-1].exp()).log()).exp()

    opt = torch.optim.LBFGS([params], max_iter=FIT_STEPS, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        var = g2 * spectrum(params) + floor
        loss = (var.log() + e / var).mean()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return spectrum(params).flatten()
