"""What the denoiser baselines (``noise2self``, ``sure-score``) share: a network trained on the
noisy observations alone as a denoiser ``f(y)``, whose outputs are the reconstructions.

Both are rows of EMDiffusion's Table 1 for denoising (``y = x + sigma eps``, pixel-independent
Gaussian noise of known ``sigma``): they serve the channels that declare ``gaussian_denoising``
(the built-in ``noise``, or a plugin's) and refuse every other with one line. Neither is EM.
How they sit in the lap structure:

- **Model.** The lap's network is the denoiser, the configured architecture (``network``) with the
  channel's conditioning slot, evaluated at the fixed timestep :data:`DENOISER_T`, its output the
  clean estimate itself (no ``v``). Its checkpoint ``kind`` is ``conditional``: like DiffEM's it is
  a model of ``x`` given ``y``, checked against the observations' channel (its spec) by
  ``reconstruct``, refused by ``sample``, and ``compare`` gives it an unconditional model by
  ``train-uncond`` on its last reconstructions, which is exactly the baselines' "train a diffusion
  model on the denoised outputs".
- **M-step.** Every lap trains on the same observations ``y`` with the method's own loss (the
  previous lap's reconstructions are not used); lap 1 starts from fresh weights, later laps go on
  training the same network (``fine_tune``), as naive and Ambient do, so the per-lap curve shows
  what the budget buys and K laps are K times one lap's training.
- **E-step.** The reconstruction of each observation is the denoiser's output, a point estimate
  (no posterior spread): the sampler is handed :class:`PointEstimate`, the same x0 estimate at every
  step, which DPM-Solver++ (the default) and DDPM return exactly after their last step; DDIM, whose
  last step goes to ``alpha_bar_0`` rather than 1, leaves ``sqrt(1 - alpha_bar_0)`` (about 0.006)
  times its starting noise on it. The network runs in full precision, once per pass the method's
  inference needs (counted by the E-step's ``estep_forwards``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from diffem_cli.core.errors import DiffemError
from diffem_cli.diffusion.denoise import Denoiser
from diffem_cli.diffusion.losses import Loss
from diffem_cli.methods.base import Method, ModelSpec, MStep, Posterior

DENOISER_T = 0
"""The timestep the denoiser network is always evaluated at (its time embedding is a constant)."""


def denoising_only(method: str, channel: Any) -> str | None:
    """None for a channel class or instance declaring ``gaussian_denoising`` (pixel-independent
    Gaussian noise of known ``sigma`` on the identity: SURE and Ambient-Tweedie need both,
    Noise2Self the independence); a one-line refusal naming the capability otherwise."""
    if getattr(channel, "gaussian_denoising", False):
        return None
    return (
        f"method {method!r} needs a denoising channel, one declaring gaussian_denoising (y = x + sigma "
        f"eps, pixel-independent Gaussian noise of known sigma, e.g. 'noise'); "
        f"{getattr(channel, 'name', None)!r} does not"
    )


def denoising_sigma(data: Any) -> float:
    """The noise level ``sigma`` of observations ``data`` on a ``gaussian_denoising`` channel."""
    return float(data.channel.noise_std(data.obs))


def apply_net(model: nn.Module, inp: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """The denoiser network's output (the clean estimate) for input ``inp`` and conditioning
    ``cond`` (rows aligned), at :data:`DENOISER_T`."""
    t = torch.full((1,), DENOISER_T, dtype=torch.long, device=inp.device)
    return model(inp, t, cond)


def full_precision(device: torch.device) -> Any:
    """A context turning off the CUDA bf16 autocast the training loop runs the loss under (a no-op
    elsewhere, where diffem computes in float32 anyway)."""
    if device.type == "cuda":
        return torch.autocast("cuda", enabled=False)
    return contextlib.nullcontext()


class PointEstimate(Denoiser):
    """A denoiser whose x0 estimate is one fixed tensor whatever ``x_t`` and ``t``: ``compute()``,
    evaluated at the first call and kept."""

    def __init__(self, compute: Callable[[], torch.Tensor]):
        self._compute = compute
        self._value: torch.Tensor | None = None

    def __call__(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        if self._value is None:
            with torch.no_grad(), full_precision(x_t.device):
                self._value = self._compute().detach().float()
        return self._value.to(x_t.dtype)


class DenoiserMethod(Method):
    """Base of the denoiser baselines (module docstring): subclasses give :meth:`loss` (the M-step's
    objective on ``batch["y"]``) and :meth:`denoise` (the trained network's estimate of ``x``)."""

    kind = "conditional"

    def accepts(self, channel: Any) -> str | None:  # noqa: D102
        return denoising_only(self.name, channel)

    def check(self, data: Any) -> None:  # noqa: D102
        super().check(data)
        if math.prod(data.shape) < 2:
            raise DiffemError(
                f"method {self.name!r} needs data of at least 2 entries, got shape {data.shape}"
            )

    def model_spec(self, data: Any) -> ModelSpec:  # noqa: D102
        return ModelSpec(self.kind, data.channel.cond_size(data.shape))

    def loss(self, data: Any, cfg: Any) -> Loss:
        """The M-step's loss on batches ``{"y": rows}`` of the observations."""
        raise NotImplementedError

    def denoise(self, model: nn.Module, y: torch.Tensor) -> torch.Tensor:
        """The trained network's clean estimate of observations ``y`` (on the network's device)."""
        raise NotImplementedError

    def inference(self) -> str:
        """How :meth:`denoise` runs, recorded in the reconstructions' manifest."""
        return self.name

    def mstep(self, data, prev, lap, laps, clean, cfg) -> MStep:  # noqa: D102
        return MStep({"y": data.obs["y"].float()}, self.loss(data, cfg), fine_tune=True)

    def posterior(self, model, data, aux) -> Posterior:  # noqa: D102
        def make(obs: dict[str, torch.Tensor]) -> Denoiser:
            y = obs["y"].float()
            return PointEstimate(lambda: self.denoise(model, y))

        return Posterior(make, record={"point_estimate": self.inference()})
