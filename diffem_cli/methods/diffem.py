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
from diffem_cli.methods.base import Method, ModelSpec, MStep, Posterior, Refresh, lap_seed, model_device
from diffem_cli.methods.conditioning import (
    SHRINKAGE_KEY,
    SIGMA_KEY,
    CondOptions,
    cond_size,
    condition,
    feature_aux,
    feature_prior,
    fit_feature_prior,
    gaussian_only_linear,
    residual_around,
    residual_sigma,
    saved_sigma,
    uses_gaussian,
    uses_residual,
)


def conditioning(
    data: Any, obs: dict[str, torch.Tensor], keep_observed: bool, prior: Any = None
) -> dict[str, torch.Tensor]:
    """What a conditional model trains on for observations ``obs``: ``cond`` (with the Gaussian
    feature of ``prior`` when given, see :mod:`.conditioning`), and with ``keep_observed`` on a
    channel that gives entries exactly, ``weight`` = 0 there (the model takes them from ``y``; see
    :class:`~diffem_cli.diffusion.denoise.KeepObserved`), 1 elsewhere."""
    out = {"cond": condition(data.channel, obs, data.shape, prior)}
    exact = data.channel.exact_entries(obs) if keep_observed else None
    if exact is not None:
        out["weight"] = 1.0 - exact.float()
    return out


def recorruption_mstep(data: Any, x: torch.Tensor, seed: int, lap: int, cfg: Any, cond: CondOptions) -> MStep:
    """The M-step of a conditional model trained on fresh corruptions of ``x`` (DiffEM's
    reconstructions, the oracle's clean data): pairs ``(x, cond(y~))`` drawn for lap ``lap`` from
    ``seed``, drawn again every ``em.recorrupt_every`` epochs when that is positive. With the
    Gaussian feature (``cond.gaussian_mean``), the Gaussian of ``x`` is fitted here and saved with
    the checkpoint, with the shrinkage of its covariance; as a residual around it
    (``cond.residual``), with the rows' spread around the feature measured here and saved too."""
    from diffem_cli.io.observations import recorrupt

    keep = cfg.sample.keep_observed
    gaussian = uses_gaussian(cond, data.channel, data.shape)
    prior = None
    aux: dict[str, torch.Tensor] = {}
    if gaussian:
        prior, amount = fit_feature_prior(x, cfg, cond, lap_seed(seed, lap, "cond"))
        aux = {**feature_aux(prior), SHRINKAGE_KEY: torch.tensor(amount, dtype=torch.float64)}
    pairs = conditioning(data, recorrupt(data.channel, x, seed, lap, data.index), keep, prior)
    refresh: Refresh | None = None
    if cfg.em.recorrupt_every > 0:

        def refresh(r: int) -> dict[str, torch.Tensor]:
            more = data.channel.corrupt(x, sample_seeds(seed, data.index, lap, r))
            return conditioning(data, more, keep, prior)

    around = None
    if uses_residual(cond, data.channel, data.shape):
        sigma = residual_sigma(x, pairs["cond"], pairs.get("weight"), cond.residual_sigma_floor)
        aux[SIGMA_KEY] = torch.tensor(sigma, dtype=torch.float64)
        around = residual_around(sigma, data.shape[0])
    return MStep({"x": x, **pairs}, VLoss(cfg.train.t_sampling, around), refresh, aux=aux)


class ConditionalMethod(Method):
    """A method whose model is a conditional denoiser of ``x`` given the channel's conditioning
    (section ``cond``: plus a Gaussian feature); its posterior samples are the conditional
    sampler's, no guidance."""

    kind = "conditional"
    option_classes = {"cond": CondOptions}

    @classmethod
    def from_record(cls, record: Any) -> Method:  # noqa: D102
        # a checkpoint written before the ``cond`` section existed took no Gaussian feature, one
        # written before ``cond.residual`` existed was no residual, and one written before
        # ``cond.gaussian_shrinkage`` existed had an unshrunk feature
        record = dict(record or {})
        record["cond"] = {
            "residual": "off",
            "gaussian_shrinkage": "off",
            **record.get("cond", {"gaussian_mean": "off"}),
        }
        return super().from_record(record)

    def accepts(self, channel: Any) -> str | None:  # noqa: D102
        return gaussian_only_linear(self.options["cond"], channel)

    def check(self, data) -> None:  # noqa: D102
        super().check(data)
        uses_residual(self.options["cond"], data.channel, data.shape)

    def model_spec(self, data) -> ModelSpec:  # noqa: D102
        gaussian = uses_gaussian(self.options["cond"], data.channel, data.shape)
        residual = uses_residual(self.options["cond"], data.channel, data.shape)
        return ModelSpec(self.kind, cond_size(data.channel, data.shape, gaussian), residual=residual)

    def posterior(self, model, data, aux) -> Posterior:  # noqa: D102
        device, shape = model_device(model), data.shape
        gaussian = uses_gaussian(self.options["cond"], data.channel, shape)
        prior = feature_prior(aux).to(device) if gaussian else None
        if uses_residual(self.options["cond"], data.channel, shape):
            model = residual_around(saved_sigma(aux), shape[0])(model)

        def make(obs: dict[str, torch.Tensor]) -> Denoiser:
            return NetworkDenoiser(model, condition(data.channel, obs, shape, prior).to(device))

        return Posterior(make)

    def config_record(self, cfg) -> dict[str, Any]:  # noqa: D102
        return {**super().config_record(cfg), "em": {"recorrupt_every": cfg.em.recorrupt_every}}


class DiffEM(ConditionalMethod):
    name = "diffem"
    description = "DiffEM: conditional diffusion model trained on re-corrupted reconstructions"
    order = 10
    compared_by_default = True

    def mstep(self, data, prev, lap, laps, clean, cfg) -> MStep:  # noqa: D102
        return recorruption_mstep(data, prev, cfg.seed, lap, cfg, self.options["cond"])
