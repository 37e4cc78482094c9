"""DiffEM (arXiv:2510.12691): EM whose E-step samples a conditional diffusion model q(x | y).

M-step: fresh corruptions ``y~ ~ Q(. | x)`` of the previous lap's reconstructions ``x``, and the
conditional denoiser fine-tuned on pairs ``(x, cond(y~))``. E-step: one sample of ``q(x | y_i)``
per real observation with the conditional sampler, no guidance.
"""

from __future__ import annotations

from typing import Any

import torch

from diffem_channels import sample_seeds
from diffem_cli.diffusion.denoise import Denoiser, NetworkDenoiser
from diffem_cli.diffusion.losses import VLoss
from diffem_cli.methods.base import Method, ModelSpec, MStep, Posterior, Refresh, model_device


def conditioning(data: Any, obs: dict[str, torch.Tensor], keep_observed: bool) -> dict[str, torch.Tensor]:
    """What a conditional model trains on for observations ``obs``: ``cond``, and with
    ``keep_observed`` on a channel that gives entries exactly, ``weight`` = 0 there (the model takes
    them from ``y``; see :class:`~diffem_cli.diffusion.denoise.KeepObserved`), 1 elsewhere."""
    out = {"cond": data.channel.condition(obs, data.shape)}
    exact = data.channel.exact_entries(obs) if keep_observed else None
    if exact is not None:
        out["weight"] = 1.0 - exact.float()
    return out


def fresh_conditioning(
    data: Any, x: torch.Tensor, seed: int, lap: int, index: torch.Tensor, keep_observed: bool = True
) -> dict[str, torch.Tensor]:
    """:func:`conditioning` of a fresh corruption of ``x`` (rows ``index``) for lap ``lap``."""
    from diffem_cli.io.observations import recorrupt

    return conditioning(data, recorrupt(data.channel, x, seed, lap, index), keep_observed)


def recorruption_mstep(data: Any, x: torch.Tensor, seed: int, lap: int, cfg: Any) -> MStep:
    """The M-step of a conditional model trained on fresh corruptions of ``x`` (DiffEM's
    reconstructions, the oracle's clean data): pairs ``(x, cond(y~))`` drawn for lap ``lap`` from
    ``seed``, drawn again every ``em.recorrupt_every`` epochs when that is positive."""
    keep = cfg.sample.keep_observed
    pairs = fresh_conditioning(data, x, seed, lap, data.index, keep)
    refresh: Refresh | None = None
    if cfg.em.recorrupt_every > 0:

        def refresh(r: int) -> dict[str, torch.Tensor]:
            more = data.channel.corrupt(x, sample_seeds(seed, data.index, lap, r))
            return conditioning(data, more, keep)

    return MStep({"x": x, **pairs}, VLoss(cfg.train.t_sampling), refresh)


class ConditionalMethod(Method):
    """A method whose model is a conditional denoiser of ``x`` given the channel's conditioning;
    its posterior samples are the conditional sampler's, no guidance."""

    kind = "conditional"

    def model_spec(self, data) -> ModelSpec:  # noqa: D102
        return ModelSpec(self.kind, data.channel.cond_size(data.shape))

    def posterior(self, model, data, aux) -> Posterior:  # noqa: D102
        device, shape = model_device(model), data.shape

        def make(obs: dict[str, torch.Tensor]) -> Denoiser:
            return NetworkDenoiser(model, data.channel.condition(obs, shape).to(device))

        return Posterior(make)


class DiffEM(ConditionalMethod):
    name = "diffem"
    description = "DiffEM: conditional diffusion model trained on re-corrupted reconstructions"
    order = 10
    compared_by_default = True

    def mstep(self, data, prev, lap, laps, clean, cfg) -> MStep:  # noqa: D102
        return recorruption_mstep(data, prev, cfg.seed, lap, cfg)

    def config_record(self, cfg) -> dict[str, Any]:  # noqa: D102
        return {"em": {"recorrupt_every": cfg.em.recorrupt_every}}
