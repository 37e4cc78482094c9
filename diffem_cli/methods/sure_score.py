"""SURE-Score (Aali et al. 2023, arXiv:2305.01166), as the two-stage baseline EMDiffusion's Table 1
row stands for: a denoiser trained on the noisy observations with Stein's unbiased risk estimate,
its outputs the reconstructions, and a diffusion model trained on them (``train-uncond``, which
``compare`` runs). For ``gaussian_denoising`` channels only (``noise``, or a plugin's): SURE needs
Gaussian noise of known ``sigma`` on the identity.

**The deviation from the paper.** SURE-Score trains *one* score network (NCSNv2, VE) jointly: the
SURE loss of the denoiser the network gives at the data's noise level, plus denoising score
matching on that denoiser's outputs, so the prior and the denoiser improve together. diffem
trains the SURE denoiser first and the diffusion model on its outputs afterwards (the joint method, with
its 90M-parameter NCSNv2, is not ported): the same objective for the denoiser, without the
coupling through shared weights.

The loss, per observation ``y`` of ``n`` entries and averaged over entries (per-pixel units):

    SURE(f, y) = ( ||f(y) - y||^2 - n sigma^2 + 2 sigma^2 div f(y) ) / n,

whose expectation over the noise is the true ``E ||f(y) - x||^2 / n`` for any (weakly)
differentiable ``f``. The divergence is the Monte-Carlo probe of the paper, one Gaussian
``b ~ N(0, I)`` per observation and step: ``div f(y) ~ b^T (f(y + eps b) - f(y)) / eps``, with
``eps = sure.eps * sigma``. For a Gaussian probe the finite difference's bias is
``eps^2 / 2`` times the third derivative along ``b`` (the ``eps`` term has odd moments of ``b``
and vanishes): with ``sure.eps = 0.1`` about 1% for a denoiser that bends on the scale of the noise,
while the perturbation (0.02 for ``sigma = 0.2`` on data in [-1, 1]) stays some 40 times above
the relative rounding ``2^-11`` of the TF32 operands CUDA convolutions use for float32 by
default. The two network passes run in one batch, in float32: the training loop's bf16 autocast
is turned off for them, its rounding (``2^-8``) would swamp the difference. (The classic
``eps = max|y| / 1000`` of Ramani et al. 2008 would put the perturbation within a factor 2 of
that rounding.) ``f`` is the lap's network
(:mod:`diffem_cli.methods.denoisers`), its conditioning slot fed zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from diffem_cli.core.checks import bad, finite
from diffem_cli.methods.denoisers import DenoiserMethod, apply_net, denoising_sigma, full_precision


@dataclass
class SureOptions:
    """SURE-Score (section ``sure``): the divergence probe's step ``eps`` as a fraction of the
    channel's noise ``sigma``."""

    eps: float = 0.1

    def validate(self) -> None:
        """One-line DiffemError for a bad value."""
        if not 0 < finite("sure.eps", self.eps) <= 1:
            raise bad("sure.eps", self.eps, "in (0, 1]")


def sure_terms(
    f0: torch.Tensor, f1: torch.Tensor, y: torch.Tensor, b: torch.Tensor, sigma: float, eps: float
) -> torch.Tensor:
    """Per row, the SURE estimate per entry from ``f0 = f(y)``, ``f1 = f(y + eps b)``."""
    n = y[0].numel()
    fit = ((f0 - y) ** 2).flatten(1).sum(1)
    div = (b * (f1 - f0)).flatten(1).sum(1) / eps
    return (fit - n * sigma**2 + 2 * sigma**2 * div) / n


class SureLoss:
    """The SURE loss (module docstring) on ``batch["y"]`` for noise std ``sigma``."""

    def __init__(self, sigma: float, eps: float = 0.1):
        self.sigma = float(sigma)
        self.eps = float(eps) * self.sigma

    def __call__(self, model, batch, scheduler, generator):  # noqa: D102
        y = batch["y"].float()
        b = torch.randn(y.shape, generator=generator, device=y.device)
        both = torch.cat([y, y + self.eps * b])
        with full_precision(y.device):  # one call: a DistributedDataParallel model runs once a step
            out = apply_net(model, both, torch.zeros_like(both)).float()
        f0, f1 = out.chunk(2)
        return sure_terms(f0, f1, y, b, self.sigma, self.eps).mean()


class SureScore(DenoiserMethod):
    name = "sure-score"
    description = "SURE-Score: a denoiser trained by Stein's unbiased risk estimate on the noisy data; no EM"
    order = 90
    option_classes = {"sure": SureOptions}

    def loss(self, data, cfg) -> SureLoss:  # noqa: D102
        return SureLoss(denoising_sigma(data), self.options["sure"].eps)

    def denoise(self, model: nn.Module, y: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return apply_net(model, y, torch.zeros_like(y)).float()
