"""The method protocol: what a learning-from-corrupted-data method brings to the lap driver.

A method says what model it trains (:meth:`Method.build`, with :attr:`Method.kind` recorded in
its checkpoints), what its M-step trains on (:meth:`Method.training_data`, a dict of aligned
tensors for the one training loop, and :meth:`Method.loss`), how its E-step draws posterior
samples for the observations (:meth:`Method.posterior`, through the one sampling loop), and what
its checkpoints record (:meth:`Method.meta`). The lap driver (:mod:`diffem_cli.pipeline.em`) knows laps,
resume, evaluation and logging only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from diffem_cli.config.run import RunConfig
from diffem_cli.core.errors import DiffemError
from diffem_cli.core.runtime import Context
from diffem_cli.diffusion.denoise import Denoiser, NetworkDenoiser
from diffem_cli.diffusion.losses import Loss, VLoss
from diffem_cli.diffusion.nets import build_network
from diffem_cli.diffusion.sampling import SampleConfig, clip_range_for, draw
from diffem_cli.io.observations import Observations

if TYPE_CHECKING:
    from diffem_cli.gaussian.model import GaussianPrior

Refresh = Callable[[int], dict[str, torch.Tensor]]


class Method:
    """Base class of every method; subclasses set the class attributes and override hooks."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    kind: ClassVar[str] = "unconditional"
    needs_clean: ClassVar[bool] = False

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg

    def check(self, data: Observations) -> None:
        """Refuse observations this method cannot serve, with a one-line DiffemError."""

    def cond_size(self, data: Observations) -> int:
        """Conditioning channels (images) or features (vectors) the network takes."""
        return 0

    def build(self, data: Observations) -> nn.Module:
        """A fresh network, seeded by the run's seed (so lap 1 starts the same everywhere)."""
        torch.manual_seed(self.cfg.seed)
        return build_network(self.cfg.network, data.shape, self.cond_size(data))

    def fine_tunes(self, lap: int, laps: int) -> bool:
        """Whether lap ``lap``'s M-step starts from the previous lap's weights (else fresh)."""
        return True

    def training_data(
        self, data: Observations, prev: torch.Tensor, lap: int, clean: torch.Tensor | None
    ) -> tuple[dict[str, torch.Tensor], Refresh | None]:
        """What lap ``lap``'s M-step trains on, given the previous lap's reconstructions."""
        return {"x": prev}, None

    def loss(self) -> Loss:
        """The M-step's objective."""
        return VLoss(self.cfg.train.t_sampling)

    def posterior(
        self,
        model: nn.Module,
        data: Observations,
        sample: SampleConfig,
        *,
        seed_parts: tuple[int, ...],
        device: torch.device,
        label: str,
        ctx: Context | None = None,
    ) -> torch.Tensor:
        """One posterior sample per observation (CPU tensor, rows aligned with ``data``)."""
        raise NotImplementedError

    def estep_record(self) -> dict[str, Any]:
        """Extra JSON-able facts about the last :meth:`posterior` call (e.g. a chosen step size),
        stored in the lap's reconstruction manifest."""
        return {}

    def unconditional_samples(
        self,
        model: nn.Module,
        meta: dict[str, Any],
        n: int,
        sample: SampleConfig,
        *,
        seed: int,
        device: torch.device,
        ctx: Context | None = None,
    ) -> torch.Tensor:
        """``n`` unconditional samples of this method's model (``diffem sample``); default: the
        plain sampler on the network as an unconditional denoiser."""
        from diffem_cli.diffusion.sampling import sample_tensors

        return sample_tensors(model, meta, n, sample, seed=seed, device=device, ctx=ctx)

    def meta(self) -> dict[str, Any]:
        """What this method's checkpoints record besides weights, data and channel."""
        return {"method": self.name, "method_config": self.settings()}

    def settings(self) -> dict[str, Any]:
        """The configuration sections this method reads (stored in checkpoints)."""
        return {}

    def aux_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors the last M-step produced besides the weights, saved in its checkpoint."""
        return {}

    def load_aux(self, aux: dict[str, torch.Tensor]) -> None:
        """Take back a checkpoint's :meth:`aux_tensors` before drawing posterior samples with it."""


def draw_posterior(
    make: Callable[[dict[str, torch.Tensor]], Denoiser],
    data: Observations,
    sample: SampleConfig,
    *,
    seed_parts: tuple[int, ...],
    device: torch.device,
    label: str,
    ctx: Context | None,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Run the sampling loop over every observation; ``make(obs_batch_on_device)`` gives the
    denoiser of one batch."""

    def for_rows(start: int, stop: int) -> Denoiser:
        return make({k: v[start:stop].to(device) for k, v in data.obs.items()})

    return draw(
        for_rows,
        len(data),
        data.shape,
        sampler=sample.sampler,
        steps=sample.steps,
        batch_size=batch_size or sample.batch_size,
        seed_parts=seed_parts,
        device=device,
        clip_range=clip_range_for(data.kind, data.value_range),
        label=label,
        ctx=ctx,
        corrections=sample.corrections,
        corrector_tau=sample.corrector_tau,
    )


class ConditionalMethod(Method):
    """A method whose model is a conditional denoiser of ``x`` given the channel's conditioning."""

    kind = "conditional"

    def cond_size(self, data: Observations) -> int:
        return data.channel.cond_size(data.shape)

    def posterior(self, model, data, sample, *, seed_parts, device, label, ctx=None):  # noqa: D102
        model = model.to(device).eval()
        shape = data.shape

        def make(obs: dict[str, torch.Tensor]) -> Denoiser:
            return NetworkDenoiser(model, data.channel.condition(obs, shape).to(device))

        return draw_posterior(make, data, sample, seed_parts=seed_parts, device=device, label=label, ctx=ctx)


class PriorMethod(Method):
    """A method whose model is an unconditional prior, with posterior samples by MMPS guidance.

    With ``mmps.covariance: gaussian`` each M-step also fits Gaussian moments to its training
    data (:func:`~diffem_cli.gaussian.moments.fit_moments`), kept in the checkpoint as auxiliary tensors
    ``moments.*`` and used as MMPS's covariance by the E-step and ``reconstruct``; a checkpoint
    without them (``train-uncond``) falls back to the Tweedie covariance."""

    kind = "unconditional"
    uses_mmps: ClassVar[bool] = True

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self.moments: GaussianPrior | None = None

    def training_data(self, data, prev, lap, clean):  # noqa: D102
        return self.prior_data(inside_box(prev, self.cfg.em.drop_outside), lap), None

    def prior_data(self, x: torch.Tensor, lap: int) -> dict[str, torch.Tensor]:
        """The M-step's data ``{"x": x}``; fits the moments of ``x`` when MMPS will use them."""
        if self.uses_mmps and self.cfg.mmps.covariance == "gaussian":
            from diffem_cli.gaussian.moments import fit_moments

            self.moments = fit_moments(x, self.cfg.em.gaussian_rank, seed=self.cfg.seed + lap)
        return {"x": x}

    def aux_tensors(self) -> dict[str, torch.Tensor]:  # noqa: D102
        if self.moments is None:
            return {}
        return {f"moments.{k}": v for k, v in self.moments.to_tensors().items()}

    def load_aux(self, aux: dict[str, torch.Tensor]) -> None:  # noqa: D102
        from diffem_cli.gaussian.model import GaussianPrior

        found = {k[len("moments.") :]: v for k, v in aux.items() if k.startswith("moments.")}
        self.moments = GaussianPrior.from_tensors(found) if found else None

    def check(self, data: Observations) -> None:
        require_linear(self.name, data)

    def mmps(self, prior: Denoiser, data: Observations, device: torch.device) -> Callable[[dict], Denoiser]:
        """``obs -> MMPS denoiser`` for batches of ``data`` with the prior denoiser ``prior``."""
        from diffem_cli.gaussian.moments import GaussianCovariance
        from diffem_cli.methods.guidance import MMPSDenoiser

        iters = self.cfg.mmps.cg_iters
        cov = None
        if self.cfg.mmps.covariance == "gaussian" and self.moments is not None:
            cov = GaussianCovariance(self.moments.to(device))

        def make(obs: dict[str, torch.Tensor]) -> Denoiser:
            return MMPSDenoiser(prior, data.channel, obs, iters, covariance=cov)

        return make

    def posterior(self, model, data, sample, *, seed_parts, device, label, ctx=None):  # noqa: D102
        make = self.mmps(NetworkDenoiser(model.to(device).eval()), data, device)
        return draw_posterior(make, data, sample, seed_parts=seed_parts, device=device, label=label, ctx=ctx)

    def settings(self) -> dict[str, Any]:
        return {"mmps": {"cg_iters": self.cfg.mmps.cg_iters, "covariance": self.cfg.mmps.covariance}}


def inside_box(x: torch.Tensor, bound: float) -> torch.Tensor:
    """The rows of vector data ``x`` inside ``[-bound, bound]`` (all rows when ``bound`` is 0 or
    the data are images, whose samples are clipped anyway): the official EM-MMPS manifold recipe
    drops guided samples thrown outside the data's box before training the prior on them."""
    if bound <= 0 or x.dim() != 2:
        return x
    keep = (x.abs() <= bound).all(dim=1)
    return x[keep] if bool(keep.any()) else x


def require_linear(method: str, data: Observations) -> None:
    """MMPS needs the channel's linear form ``A``, ``A^T`` and noise level."""
    if not data.channel.linear:
        raise DiffemError(
            f"method {method!r} samples posteriors by MMPS, which needs a linear channel; "
            f"{data.channel.name!r} has no linear form (use --method dps-em or diffem)"
        )
