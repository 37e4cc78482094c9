"""DPS-EM (EMDiffusion, Bai et al. NeurIPS 2024): EM with an unconditional prior and DPS E-steps.

M-step: the prior fine-tuned on the previous lap's reconstructions; with ``dps.reset_last = N``
the last N laps retrain from fresh weights instead (the paper's phase 2). E-step: diffusion
posterior sampling (:class:`~diffem_cli.methods.guidance.DPSDenoiser`): a gradient step on the data
residual ``||y - F(x0)||`` through the denoiser at every sampler step, with likelihood weight
``dps.scale``. With ``dps.adaptive`` the weight is chosen afresh at every E-step, as in the
paper: each value of ``dps.grid`` samples the first ``dps.subset`` observations (same noise for
every value), and the one with the smallest mean residual ``||y - F(x)||`` samples them all; the
chosen value is recorded in the lap's record (``dps_scale``).

Works for every channel with a differentiable forward model: linear ones (``F = A``) and
``jpeg`` (kornia's differentiable codec), or any plugin that sets ``differentiable``. Lap 0 is
diffem's Gaussian start (linear channels), the observations themselves (others), or an
unconditional ``--warm-start`` checkpoint (e.g. ``train-uncond`` on a few clean images, the
paper's initialisation) sampled by DPS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from diffem_cli.core.errors import DiffemError
from diffem_cli.diffusion.denoise import Denoiser, NetworkDenoiser
from diffem_cli.methods.base import PriorMethod, draw_posterior


@dataclass
class Rows:
    """The first rows of an observations set, with what the sampling loop reads of it."""

    obs: dict[str, torch.Tensor]
    index: torch.Tensor
    shape: tuple[int, ...]
    kind: str
    value_range: Any

    def __len__(self) -> int:
        return len(self.index)


def first_rows(data: Any, k: int) -> Rows:
    """A view of the first ``k`` observations of ``data``."""
    return Rows(
        {n: v[:k] for n, v in data.obs.items()}, data.index[:k], data.shape, data.kind, data.value_range
    )


def mean_residual(channel: Any, obs: dict[str, torch.Tensor], x: torch.Tensor) -> float:
    """Mean over samples of ``||y - F(x)||_2``."""
    from diffem_cli.methods.guidance import residual_norm

    with torch.no_grad():
        return float(residual_norm(channel, obs, x.float()).mean())


class DPSEM(PriorMethod):
    name = "dps-em"
    description = "DPS-EM (EMDiffusion): unconditional prior, E-step by diffusion posterior sampling"
    uses_mmps = False

    def __init__(self, cfg):
        super().__init__(cfg)
        self._record: dict[str, Any] = {}

    def check(self, data):  # noqa: D102
        channel = data.channel
        if not (channel.linear or getattr(channel, "differentiable", False)):
            raise DiffemError(
                f"method 'dps-em' needs a channel with a differentiable forward model (linear ones, "
                f"jpeg); {channel.name!r} declares none"
            )

    def fine_tunes(self, lap: int, laps: int) -> bool:  # noqa: D102
        return lap <= laps - self.cfg.dps.reset_last

    def posterior(self, model, data, sample, *, seed_parts, device, label, ctx=None):  # noqa: D102
        model = model.to(device).eval()
        prior = NetworkDenoiser(model)
        dps = self.cfg.dps

        def draw_with(scale: float, rows: Any, what: str) -> torch.Tensor:
            from diffem_cli.methods.guidance import DPSDenoiser

            def make(obs: dict[str, torch.Tensor]) -> Denoiser:
                return DPSDenoiser(prior, data.channel, obs, scale)

            return draw_posterior(
                make, rows, sample, seed_parts=seed_parts, device=device, label=what, ctx=ctx
            )

        scale = float(dps.scale)
        self._record = {"dps_scale": scale}
        if dps.adaptive:
            rows = first_rows(data, min(int(dps.subset), len(data)))
            residuals = {}
            for value in dps.grid:
                x = draw_with(float(value), rows, f"{label}: weight {value:g}")
                residuals[float(value)] = mean_residual(data.channel, rows.obs, x)
            scale = min(residuals, key=lambda v: (residuals[v], v))
            self._record = {
                "dps_scale": scale,
                "dps_residuals": [[v, r] for v, r in residuals.items()],
            }
        return draw_with(scale, data, label)

    def estep_record(self) -> dict[str, Any]:  # noqa: D102
        return dict(self._record)

    def settings(self) -> dict[str, Any]:  # noqa: D102
        d = self.cfg.dps
        return {
            "dps": {
                "scale": d.scale,
                "adaptive": d.adaptive,
                "grid": list(d.grid),
                "subset": d.subset,
                "reset_last": d.reset_last,
            }
        }
