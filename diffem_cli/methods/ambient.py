"""Ambient-Diffusion (Daras et al. 2023): learn a prior from masked images, no EM.

For a masking channel (``mask``, ``box``, or a plugin declaring ``masked_observation``), each
observation ``y_i = A_i x_i`` is hidden once more by a further mask ``B_i`` keeping each observed
pixel with probability ``1 - ambient.delta`` (shared by colour channels, drawn once per sample
from a generator seeded by the sample's index alone, so fixed across epochs, laps and runs, as
the official code does). The network sees ``[M x_t, M]`` with ``M = A_i B_i`` and is
scored only on the originally observed pixels ``A_i``, including those ``B_i`` hides: that is
what forces it to predict ``E[x | M x_t, M]`` for every pixel.

Parameterisation (:func:`ambient_x0`): on pixels it sees (``M = 1``) the network output is ``v``,
``x0 = alpha_t x_t - sigma_t out``, as for every other diffem model; on pixels it does not see it
predicts ``x0 = -out`` directly (a ``v``-form there would need outputs of order ``1 / sigma_t``
at low noise). The loss (:class:`AmbientLoss`) is the squared error of that output against the
output that would give ``x0 = y``, averaged over ``A_i``: Ambient's ``A (D - x)`` loss in output
units (per-pixel weights do not change the minimiser).

Every lap fine-tunes on the same observations. Sampling:

- ``diffem sample``: Ambient's fixed-mask sampler: one mask per sample, a fresh channel mask
  times a fresh further mask (survival ``(1 - rho)(1 - delta)`` for ``mask``), the denoiser
  ``D([M x_t, M])`` at every step;
- posterior samples (E-step, ``reconstruct``): the same sampler with each observation's own
  training mask ``M_i = A_i B_i`` as the network's mask (exactly the input it was trained on for
  that observation; ``A_i`` alone would be denser than any training mask), and the observed
  pixels kept: the x0 estimate's entries on ``A_i`` are replaced by ``y_i`` at every step.

Noisy masked observations (``sigma > 0``) are refused: the loss would teach the network ``y``'s
noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from diffem_channels import Channel, per_sample, sample_seeds
from diffem_cli.core.checks import bad, finite
from diffem_cli.core.errors import DiffemError
from diffem_cli.core.runtime import autocast
from diffem_cli.diffusion.denoise import Denoiser, alpha_sigma, x0_from_v
from diffem_cli.diffusion.losses import draw_timesteps
from diffem_cli.methods.base import Method, ModelSpec, MStep, Posterior, Prior, model_device


@dataclass
class AmbientOptions:
    """Ambient-Diffusion (section ``ambient``): probability ``delta`` of hiding an observed pixel
    once more."""

    delta: float = 0.1

    def validate(self) -> None:
        """One-line DiffemError for a bad value."""
        if not 0 <= finite("ambient.delta", self.delta) < 1:
            raise bad("ambient.delta", self.delta, "in [0, 1)")


FURTHER_TAG = 0xA3B1  # seeds of the further masks B_i: (tag, sample index), whatever the run's seed
FURTHER_STREAM = 2  # apart from the channels' mask (0) and noise (1) streams of the same seeds
SAMPLE_TAG = 0xA3B2  # seeds of the unconditional sampler's masks: (seed, tag, sample number)


def further_mask(shape: tuple[int, ...], seeds: torch.Tensor, delta: float) -> torch.Tensor:
    """``B``: 0/1 float ``(len(seeds), *shape)`` for data ``shape``, keeping each pixel with
    probability ``1 - delta`` (one draw per pixel shared by colour channels); row ``i`` from
    ``seeds[i]`` alone."""
    draw_shape = (1, *shape[1:]) if len(shape) == 3 else tuple(shape)
    keep = (per_sample(seeds, draw_shape, "rand", FURTHER_STREAM) >= delta).float()
    return keep.expand(len(seeds), *shape).contiguous()


def observed_mask(channel: Channel, obs: dict[str, torch.Tensor]) -> torch.Tensor:
    """``A``: the channel's observation mask as a float 0/1 tensor shaped like the data batch."""
    return channel.observation_mask(obs).float()


def sampler_masks(
    channel: Channel, shape: tuple[int, ...], seeds: torch.Tensor, delta: float
) -> torch.Tensor:
    """Ambient's fixed sampling masks, one per seed: a fresh observation mask of the channel times
    a fresh further mask (survival ``(1 - rho)(1 - delta)`` for ``mask``)."""
    fresh = channel.corrupt(torch.zeros((len(seeds), *shape)), seeds)
    return observed_mask(channel, fresh) * further_mask(shape, seeds, delta)


def ambient_x0(out: torch.Tensor, x_in: torch.Tensor, mask: torch.Tensor, a, s) -> torch.Tensor:
    """The x0 estimate from the network output: ``a x_in - s out`` where ``mask = 1``, ``-out``
    elsewhere (``a``, ``s`` scalars or per-sample, broadcastable)."""
    return mask * x0_from_v(x_in, out, a, s) - (1 - mask) * out


class AmbientDenoiser(Denoiser):
    """``D([M x_t, M])`` for a fixed mask ``M`` per row; with ``keep = (A, y)`` the entries
    observed in ``A`` are replaced by ``y`` (posterior sampling)."""

    def __init__(
        self, net: nn.Module, mask: torch.Tensor, keep: tuple[torch.Tensor, torch.Tensor] | None = None
    ):
        self.net, self.mask, self.keep = net, mask, keep

    def __call__(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        a, s = alpha_sigma(t)
        x_in = self.mask * x_t
        tt = torch.full((1,), int(t), device=x_t.device, dtype=torch.long)
        with autocast(x_t.device):
            out = self.net(x_in, tt, self.mask).float()
        x0 = ambient_x0(out, x_in, self.mask, a, s)
        if self.keep is not None:
            observed, y = self.keep
            x0 = observed * y + (1 - observed) * x0
        return x0


class AmbientLoss:
    """Ambient's loss on the observed pixels: batch ``y`` (observations), ``mask`` (``A``) and
    ``further`` (``A B``), all shaped like the data."""

    def __init__(self, t_sampling: str = "uniform"):
        self.t_sampling = t_sampling

    def __call__(self, model, batch, scheduler, generator):  # noqa: D102
        y, observed, m = batch["y"], batch["mask"], batch["further"]
        t = draw_timesteps(len(y), scheduler, self.t_sampling, generator, y.device)
        noise = torch.randn(y.shape, generator=generator, device=y.device)
        abar = scheduler.alphas_cumprod.to(y.device)[t].float().view(-1, *([1] * (y.dim() - 1)))
        a, s = abar.sqrt(), (1 - abar).sqrt()
        x_in = m * (a * y + s * noise)
        out = model(x_in, t, m).float()
        # the output that gives x0 = y: v = (a x_in - y) / s where seen, -y where hidden
        target = m * (a * x_in - y) / s - (1 - m) * y
        err = observed * (out - target) ** 2
        return err.sum() / observed.sum().clamp_min(1.0)


class Ambient(Method):
    name = "ambient"
    description = "Ambient-Diffusion: a prior learnt from further-masked observations, no EM"
    order = 60
    kind = "ambient"
    option_classes = {"ambient": AmbientOptions}

    @property
    def delta(self) -> float:
        """The further masks' hiding probability."""
        return float(self.options["ambient"].delta)

    def accepts(self, channel: Any) -> str | None:  # noqa: D102
        if getattr(channel, "masked_observation", False):
            return None
        return (
            f"method 'ambient' needs a channel whose observation is a masked image (mask, box, or a "
            f"plugin declaring masked_observation); {channel.name!r} is not one"
        )

    def check(self, data) -> None:  # noqa: D102
        super().check(data)
        channel = data.channel
        noise = float(channel.noise_std(data.obs)) if channel.linear else 0.0
        if noise > 0:
            raise DiffemError(
                f"method 'ambient' assumes noiseless masked observations; channel {channel.name!r} "
                f"adds noise of std {noise:g}"
            )

    def model_spec(self, data) -> ModelSpec:  # noqa: D102
        return ModelSpec(self.kind, data.shape[0])

    def checkpoint_meta(self, data) -> dict[str, Any]:
        """The observations' mask survival times ``1 - delta`` (what ``diffem sample`` matches)."""
        survival = None
        if len(data):
            survival = float(observed_mask(data.channel, data.obs).mean()) * (1 - self.delta)
        return {"ambient": {"delta": self.options["ambient"].delta, "survival": survival}}

    def further(self, data) -> torch.Tensor:
        """``A_i B_i`` for every observation (fixed per sample index)."""
        seeds = sample_seeds(FURTHER_TAG, data.index)
        return observed_mask(data.channel, data.obs) * further_mask(data.shape, seeds, self.delta)

    def mstep(self, data, prev, lap, laps, clean, cfg) -> MStep:  # noqa: D102
        observed = observed_mask(data.channel, data.obs)
        tensors = {"y": data.obs["y"].float(), "mask": observed, "further": self.further(data)}
        return MStep(tensors, AmbientLoss(cfg.train.t_sampling))

    def posterior(self, model, data, aux) -> Posterior:  # noqa: D102
        def make(obs: dict[str, torch.Tensor]) -> Denoiser:
            return AmbientDenoiser(model, obs["_further"], (obs["_observed"], obs["y"].float()))

        extra = {"_further": self.further(data), "_observed": observed_mask(data.channel, data.obs)}
        return Posterior(make, extra=extra)

    def prior(self, model, meta, seed) -> Prior:  # noqa: D102
        from diffem_cli.io.registry import channel_from_spec

        channel = channel_from_spec(meta["channel"])
        shape = tuple(meta["data"]["shape"])
        delta, device = self.delta, model_device(model)

        def make(start: int, stop: int) -> Denoiser:
            seeds = sample_seeds(seed, range(start, stop), SAMPLE_TAG)
            return AmbientDenoiser(model, sampler_masks(channel, shape, seeds, delta).to(device))

        return Prior(make, "sample (ambient)")
