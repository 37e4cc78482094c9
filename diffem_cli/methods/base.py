"""The method protocol: what a learning-from-corrupted-data method brings to the lap driver.

A method is a class registered in the entry-point group ``diffem.methods`` (see
:mod:`.registry`). An instance holds its option sections and nothing else (DPS's methods: also
their run's seed); every hook is a function of its arguments, and every result a return value:

- :meth:`Method.accepts` / :meth:`Method.check`: refuse a channel, or observations, it cannot
  serve (one-line :class:`~diffem_cli.core.errors.DiffemError`);
- :meth:`Method.model_spec`: the model it trains (its kind, recorded in checkpoints, and its
  conditioning size);
- :meth:`Method.mstep`: what lap ``k``'s M-step trains on (:class:`MStep`: tensors for the one
  training loop, the loss, an optional refresh, whether it fine-tunes, auxiliary tensors saved
  with the checkpoint);
- :meth:`Method.posterior`: how posterior samples are drawn with a trained model
  (:class:`Posterior`: guidance as a denoiser factory, or a function choosing one through a
  driver-provided ``draw`` handle, and the E-step's record);
- :meth:`Method.prior`: how unconditional samples are drawn (:class:`Prior`).

The driver (:mod:`diffem_cli.pipeline`) runs the one training loop and the one sampling loop with
the device, the distributed context, the seeds and the progress labels; methods never see them.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from diffem_channels import mix_seed
from diffem_cli.config.run import RunConfig
from diffem_cli.core.errors import DiffemError
from diffem_cli.diffusion.denoise import Denoiser, NetworkDenoiser
from diffem_cli.diffusion.losses import Loss, VLoss

Refresh = Callable[[int], dict[str, torch.Tensor]]
Make = Callable[[dict[str, torch.Tensor]], Denoiser]
"""``obs batch (on the sampling device) -> Denoiser`` for those rows."""
Draw = Callable[[Make, int | torch.Tensor, str], torch.Tensor]
"""``draw(make, rows, note)``: samples (CPU) of the first ``rows`` observations with ``make``, or,
when ``rows`` is a tensor of row indices, of those observations in that order."""


@dataclass
class ModelSpec:
    """The model a method trains: ``kind`` (``conditional``, ``unconditional``, or the method's
    own, e.g. ``ambient``), the conditioning channels (images) or features (vectors) it takes,
    and whether its network is a residual around a closed-form denoiser (``residual``: trained
    from scratch, its last layer starts at zero, since a zero output is already a denoiser)."""

    kind: str
    cond_size: int = 0
    residual: bool = False


@dataclass
class MStep:
    """What one M-step trains on: aligned ``tensors`` (same rows) for the one training loop, its
    ``loss``, an optional ``refresh(r)`` giving new values of some tensors every
    ``em.recorrupt_every`` epochs, whether it starts from the previous lap's weights
    (``fine_tune``) and ``aux`` tensors saved with the checkpoint (e.g. Gaussian moments)."""

    tensors: dict[str, torch.Tensor]
    loss: Loss
    refresh: Refresh | None = None
    fine_tune: bool = True
    aux: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Posterior:
    """How a posterior sample per observation is drawn.

    ``make`` gives the denoiser of a batch of observations (their tensors, plus the rows of
    ``extra``, aligned with the observations, under the same keys). A method that must choose
    first (e.g. a guidance weight) sets ``choose`` instead: called with the driver's ``draw``
    handle, it returns the ``make`` that samples every observation and the E-step's record.
    ``record``: JSON-able facts stored in the lap's reconstruction manifest."""

    make: Make | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)
    choose: Callable[[Draw], tuple[Make, dict[str, Any]]] | None = None


@dataclass
class Prior:
    """How unconditional samples are drawn: ``make(start, stop)`` gives the denoiser of samples
    ``start:stop``; ``label`` names the progress bar."""

    make: Callable[[int, int], Denoiser]
    label: str = "sample"


class Method:
    """Base of every method: subclasses set the class attributes and override the hooks.

    ``option_classes`` maps each option section the method reads (``mmps``, ``dps``...) to its
    dataclass (defaults for every field, ``validate()`` raising a one-line DiffemError); several
    methods may share a class. ``needs_clean``: its M-step trains on clean data (``--clean``).
    ``order`` (set on the class itself, not inherited): where ``diffem methods`` lists it, and
    which of several methods able to sample a warm start's model is asked first; ties by name.
    ``compared_by_default``: ``diffem compare`` runs it when ``--methods`` is not given.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    kind: ClassVar[str] = "unconditional"
    needs_clean: ClassVar[bool] = False
    option_classes: ClassVar[Mapping[str, type]] = {}
    order: ClassVar[int] = 1000
    compared_by_default: ClassVar[bool] = False

    def __init__(self, options: Mapping[str, Any] | None = None):
        given = dict(options or {})
        self.options: dict[str, Any] = {
            section: copy.deepcopy(given[section]) if section in given else cls()
            for section, cls in self.option_classes.items()
        }

    @classmethod
    def from_config(cls, cfg: RunConfig) -> Method:
        """The method configured by ``cfg``'s option sections (defaults for missing ones)."""
        return cls({s: cfg.options[s] for s in cls.option_classes if s in cfg.options})

    @classmethod
    def from_record(cls, record: Mapping[str, Any] | None) -> Method:
        """The method configured as a checkpoint's ``method_config`` says (unknown keys and
        sections ignored, missing ones at their defaults)."""
        options = {}
        for section, klass in cls.option_classes.items():
            values = (record or {}).get(section) or {}
            known = {f.name for f in dataclasses.fields(klass)}
            options[section] = klass(**{k: copy.deepcopy(v) for k, v in values.items() if k in known})
        return cls(options)

    def accepts(self, channel: Any) -> str | None:
        """Why this method cannot serve ``channel``, as a one-line message, or None. ``channel`` is
        a channel class or instance, read through its class-level declarations only (``name``,
        ``linear``, ``differentiable``, ``masked_observation``, ``gaussian_denoising``), so
        ``diffem methods`` can ask
        without data."""
        return None

    def check(self, data: Any) -> None:
        """Refuse observations this method cannot serve, with a one-line DiffemError."""
        reason = self.accepts(data.channel)
        if reason:
            raise DiffemError(reason)

    def model_spec(self, data: Any) -> ModelSpec:
        """The model this method trains on ``data``."""
        return ModelSpec(self.kind, 0)

    def mstep(
        self, data: Any, prev: torch.Tensor, lap: int, laps: int, clean: torch.Tensor | None, cfg: RunConfig
    ) -> MStep:
        """Lap ``lap``'s M-step, given the previous lap's reconstructions ``prev``."""
        return MStep({"x": prev}, VLoss(cfg.train.t_sampling))

    def posterior(self, model: nn.Module, data: Any, aux: Mapping[str, torch.Tensor]) -> Posterior:
        """Posterior sampling with ``model`` (on its device, in eval mode) for ``data``, given the
        checkpoint's auxiliary tensors ``aux``."""
        raise NotImplementedError

    def passes_per_step(self, channel: Any) -> float:
        """Network passes (forwards plus vector-Jacobian products) one step of this method's
        posterior sampler costs per observation on ``channel``: what ``compare --match compute``
        divides the sampler's steps by. Default 1: one forward pass (a conditional model, or a
        prior sampled without guidance)."""
        return 1.0

    def prior(self, model: nn.Module, meta: Mapping[str, Any], seed: int) -> Prior:
        """Unconditional sampling with ``model`` (on its device, eval mode) of checkpoint ``meta``;
        default: the network as an unconditional denoiser."""
        denoiser = NetworkDenoiser(model)
        return Prior(lambda _start, _stop: denoiser)

    def checkpoint_meta(self, data: Any) -> dict[str, Any]:
        """Facts about the data this method's checkpoints record besides its options."""
        return {}

    def config_record(self, cfg: RunConfig) -> dict[str, Any]:
        """The checkpoint's ``method_config``: every option section, verbatim."""
        return {s: dataclasses.asdict(o) for s, o in self.options.items()}


def lap_seed(seed: int, lap: int, purpose: str) -> int:
    """The seed of lap ``lap``'s ``purpose`` stream (``"mstep"``, ``"moments"``...) under the run's
    ``seed``, the three hashed together: ``seed + lap`` would give seed s lap l the draws of seed
    s + 1 lap l - 1, so runs with neighbouring seeds would not be independent."""
    tag = int.from_bytes(hashlib.blake2b(purpose.encode(), digest_size=8).digest(), "little")
    return mix_seed(seed, lap, tag)


def model_device(model: nn.Module) -> torch.device:
    """The device ``model``'s parameters live on (CPU for a model without parameters)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def inside_box(x: torch.Tensor, bound: float) -> torch.Tensor:
    """The rows of vector data ``x`` inside ``[-bound, bound]`` (all rows when ``bound`` is 0 or
    the data are images, whose samples are clipped anyway): the official EM-MMPS manifold recipe
    drops guided samples thrown outside the data's box before training the prior on them."""
    if bound <= 0 or x.dim() != 2:
        return x
    keep = (x.abs() <= bound).all(dim=1)
    return x[keep] if bool(keep.any()) else x
