"""DPS-EM (EMDiffusion, Bai et al. NeurIPS 2024): EM with an unconditional prior and DPS E-steps.

M-step: the prior fine-tuned on the previous lap's reconstructions; with ``dps.reset_last = N``
the last N laps retrain from fresh weights instead (the paper's phase 2). E-step: diffusion
posterior sampling (:class:`~diffem_cli.methods.guidance.DPSDenoiser`): a gradient step on the data
residual ``||y - F(x0)||`` through the denoiser at every sampler step, with likelihood weight
``dps.scale``.

``dps.weight_rule`` chooses the weight afresh at every E-step instead: each value of ``dps.grid``
samples the same random ``dps.subset`` observations (same noise for every value), and one value
samples them all, recorded in the lap's record (``dps_scale``). The rows are drawn under the run's
seed: the same at every E-step of a run (and in ``reconstruct`` from its checkpoints, which record
the seed), other rows for another seed. ``smallest`` (also spelt
``dps.adaptive = true``) is EMDiffusion's rule: the smallest mean residual ``||y - F(x)||``; it
rewards fitting the noise, so it drifts to the largest weight. ``discrepancy`` is Morozov's
discrepancy principle: the value whose root-mean-square scaled residual ``||y - F(x)|| / sqrt(m)``
(``m`` observed entries) is nearest the channel's noise level ``s``, what exact posterior samples
give (``x`` and a posterior sample are exchangeable given ``y``, so ``E||y - F(x_k)||^2 = m s^2``).
On a noiseless channel (``s = 0``, or a non-linear one such as ``jpeg``, whose codec adds no noise)
it takes the smallest residual up to its sampling error: the smallest weight whose mean square
residual is within one standard error of the least (the one-standard-error rule), so
indistinguishable fits go to the weaker guidance. Weights whose samples are not finite are never
chosen.

Works for every channel with a differentiable forward model: linear ones (``F = A``) and
``jpeg`` (kornia's differentiable codec), or any plugin that sets ``differentiable``. Lap 0 is
diffem's Gaussian start (linear channels), the observations themselves (others), or an
unconditional ``--warm-start`` checkpoint (e.g. ``train-uncond`` on a few clean images, the
paper's initialisation) sampled by DPS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from diffem_channels import ChannelError, mix_seed
from diffem_cli.core.checks import bad, choice, finite, int_at_least
from diffem_cli.core.errors import DiffemError
from diffem_cli.diffusion.denoise import Denoiser, NetworkDenoiser
from diffem_cli.methods.base import Draw, Make, Method, MStep, Posterior, inside_box
from diffem_cli.methods.em_mmps import prior_mstep

WEIGHT_RULES = ("fixed", "smallest", "discrepancy")
SUBSET_TAG = 0x445053
"""Mixed with the run's seed into the seed of the random rows the weight rules sample."""


@dataclass
class DPSOptions:
    """Diffusion posterior sampling (section ``dps``): likelihood weight and how it is chosen.

    ``scale``: the weight with ``weight_rule: fixed``. Its default, 100, is what EMDiffusion's
    smallest-residual rule picked on masked digits (bench/results/findings.md); the official code
    has no single equivalent (docs/concepts.md). ``weight_rule``: ``fixed``, ``smallest``
    (EMDiffusion's rule; ``adaptive: true`` is its older spelling) or ``discrepancy`` (the
    residual nearest the noise level), each value of ``grid`` tried on ``subset`` random rows."""

    scale: float = 100.0
    weight_rule: str = "fixed"
    adaptive: bool = False
    grid: list[float] = field(default_factory=lambda: [10.0, 30.0, 100.0, 300.0])
    subset: int = 256
    reset_last: int = 0

    def validate(self) -> None:
        """One-line DiffemError for a bad value."""
        if finite("dps.scale", self.scale) <= 0:
            raise bad("dps.scale", self.scale, "> 0")
        choice("dps.weight_rule", self.weight_rule, WEIGHT_RULES)
        if self.adaptive and self.weight_rule not in ("fixed", "smallest"):
            raise bad("dps.adaptive", self.adaptive, "false with dps.weight_rule=discrepancy")
        if not self.grid:
            raise bad("dps.grid", self.grid, "a non-empty list of positive numbers")
        for g in self.grid:
            if finite("dps.grid", g) <= 0:
                raise bad("dps.grid", self.grid, "a non-empty list of positive numbers")
        int_at_least("dps.subset", self.subset, 1)
        int_at_least("dps.reset_last", self.reset_last, 0)

    def rule(self) -> str:
        """The weight rule in force: ``adaptive: true`` reads as ``smallest``."""
        return "smallest" if self.adaptive and self.weight_rule == "fixed" else self.weight_rule


def differentiable_only(method: str, channel: Any) -> str | None:
    """DPS needs a differentiable forward model: a linear channel, or one declaring it."""
    if getattr(channel, "linear", False) or getattr(channel, "differentiable", False):
        return None
    return (
        f"method {method!r} needs a channel with a differentiable forward model (linear ones, "
        f"jpeg); {channel.name!r} declares none"
    )


def scaled_residuals(channel: Any, obs: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Per sample ``||y - F(x)|| / sqrt(m)`` in float64, ``m`` the observed entries of a masking
    channel, else the size of ``y``; NaN for a sample that is not finite."""
    from diffem_cli.methods.guidance import residual_norm

    with torch.no_grad():
        norm = residual_norm(channel, obs, x.float()).double()
    if getattr(channel, "masked_observation", False):
        m = channel.observation_mask(obs).flatten(1).sum(1).double().clamp_min(1.0)
    else:
        m = torch.full_like(norm, float(obs["y"][0].numel()))
    finite_rows = torch.isfinite(x.flatten(1)).all(1)
    return torch.where(finite_rows, norm / m.sqrt(), torch.full_like(norm, float("nan")))


def noise_level(channel: Any, obs: dict[str, torch.Tensor]) -> float:
    """The channel's noise level ``s`` (0 for a channel that declares none, e.g. ``jpeg``)."""
    try:
        return float(channel.noise_std(obs))
    except ChannelError:
        return 0.0


def pick_weight(residuals: dict[float, torch.Tensor], noise: float, rule: str) -> float:
    """The weight a rule picks from each weight's per-sample scaled residuals (same rows).

    ``smallest``: the least mean residual. ``discrepancy``: the root-mean-square residual nearest
    ``noise``; at ``noise == 0``, the smallest weight whose mean square residual is within one
    standard error of the least. Weights with a non-finite sample are left out; ties go to the
    smaller weight."""
    ok = {v: r for v, r in residuals.items() if bool(torch.isfinite(r).all())}
    if not ok:
        raise DiffemError(
            f"every dps.grid weight ({', '.join(f'{v:g}' for v in residuals)}) gave non-finite samples; "
            "give smaller weights"
        )
    if rule == "smallest":
        return min(ok, key=lambda v: (float(ok[v].mean()), v))
    if noise > 0:
        return min(ok, key=lambda v: (abs(float(ok[v].pow(2).mean().sqrt()) - noise), v))
    squares = {v: r.pow(2) for v, r in ok.items()}
    best = min(squares, key=lambda v: (float(squares[v].mean()), v))
    spread = squares[best]
    se = float(spread.std()) / len(spread) ** 0.5 if len(spread) > 1 else 0.0
    return min(v for v, sq in squares.items() if float(sq.mean()) <= float(spread.mean()) + se)


DPS_PASSES = 2.0
"""Network passes per DPS step: the forward pass and the gradient of the residual through it."""


def subset_rows(n: int, k: int, seed: int) -> torch.Tensor:
    """``k`` of ``n`` rows drawn at random under the run's ``seed`` (hashed with
    :data:`SUBSET_TAG`, so neighbouring seeds pick unrelated rows), in increasing order."""
    g = torch.Generator().manual_seed(mix_seed(seed, SUBSET_TAG))
    return torch.randperm(n, generator=g)[:k].sort().values


def dps_posterior(model: nn.Module, data: Any, dps: DPSOptions, seed: int) -> Posterior:
    """DPS posterior sampling with the prior ``model``: weight ``dps.scale``, or the grid value
    ``dps.weight_rule`` picks on ``dps.subset`` observations drawn under the run's ``seed`` (same
    noise for every value); the chosen weight, the rule and every value's residual are the
    E-step's record."""
    from diffem_cli.methods.guidance import DPSDenoiser

    prior = NetworkDenoiser(model)
    channel = data.channel
    rule = dps.rule()

    def with_scale(scale: float) -> Make:
        def make(obs: dict[str, torch.Tensor]) -> Denoiser:
            return DPSDenoiser(prior, channel, obs, scale)

        return make

    if rule == "fixed":
        scale = float(dps.scale)
        return Posterior(with_scale(scale), record={"dps_scale": scale})

    def choose(draw: Draw) -> tuple[Make, dict[str, Any]]:
        rows = subset_rows(len(data), min(int(dps.subset), len(data)), seed)
        obs = {n: v[rows] for n, v in data.obs.items()}
        noise = noise_level(channel, obs)
        residuals = {}
        for value in dps.grid:
            x = draw(with_scale(float(value)), rows, f"weight {value:g}")
            residuals[float(value)] = scaled_residuals(channel, obs, x)
        scale = pick_weight(residuals, noise, rule)
        summary = "mean" if rule == "smallest" else "rms"
        stat = {
            v: float(r.mean() if rule == "smallest" else r.pow(2).mean().sqrt()) for v, r in residuals.items()
        }
        stat = {v: r if math.isfinite(r) else None for v, r in stat.items()}  # JSON has no NaN
        record = {
            "dps_scale": scale,
            "dps_rule": rule,
            "dps_noise": noise,
            "dps_residuals": [[v, r] for v, r in stat.items()],
            "dps_residual_stat": summary,
        }
        return with_scale(scale), record

    return Posterior(choose=choose)


class RunSeeded(Method):
    """A method that remembers its run's seed (``cfg.seed``, or the ``run`` section of a
    checkpoint's record), for DPS's weight-rule rows: the one value it holds besides its options."""

    seed = 0

    @classmethod
    def from_config(cls, cfg: Any) -> Method:  # noqa: D102
        method = super().from_config(cfg)
        method.seed = int(cfg.seed)
        return method

    @classmethod
    def from_record(cls, record: Any) -> Method:  # noqa: D102
        method = super().from_record(record)
        method.seed = int(((record or {}).get("run") or {}).get("seed", 0))
        return method

    def config_record(self, cfg) -> dict[str, Any]:  # noqa: D102
        return {**super().config_record(cfg), "run": {"seed": self.seed}}


class DPSEM(RunSeeded):
    name = "dps-em"
    description = "DPS-EM (EMDiffusion): unconditional prior, E-step by diffusion posterior sampling"
    order = 50
    option_classes = {"dps": DPSOptions}

    def accepts(self, channel: Any) -> str | None:  # noqa: D102
        return differentiable_only(self.name, channel)

    def mstep(self, data, prev, lap, laps, clean, cfg) -> MStep:  # noqa: D102
        step = prior_mstep(inside_box(prev, cfg.em.drop_outside), lap, cfg, None)
        step.fine_tune = lap <= laps - self.options["dps"].reset_last
        return step

    def passes_per_step(self, channel: Any) -> float:  # noqa: D102
        return DPS_PASSES

    def posterior(self, model, data, aux) -> Posterior:  # noqa: D102
        return dps_posterior(model, data, self.options["dps"], self.seed)
