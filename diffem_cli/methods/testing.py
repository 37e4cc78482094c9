"""A contract kit for methods: :func:`check_method` checks a method on tiny data.

Like :func:`diffem_channels.testing.check_channel` for channels, it raises ``AssertionError``
naming the first broken promise:

- the class declares a name, a one-line description, a kind and option dataclasses;
- its options round-trip through a checkpoint's metadata (``config_record`` -> JSON ->
  ``from_record``) unchanged;
- ``check`` accepts the observations it is given, and refuses the channels in ``refuse`` (and
  any its ``accepts`` refuses) with a one-line ``DiffemError``;
- the M-step's tensors are finite with aligned rows (so are a refresh's and the auxiliary
  tensors), and its loss on a batch of them is a finite scalar;
- the posterior of a fresh network gives finite samples of the data's shape, one row per
  observation, the same twice for a seed; so does the unconditional sampler of a model that is
  not conditional.

The sampling runs on the CPU with 2 sampler steps; the networks are untrained and tiny.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from diffem_channels import Channel, sample_seeds
from diffem_cli.config.run import RunConfig
from diffem_cli.core.errors import DiffemError
from diffem_cli.diffusion.nets import build_network
from diffem_cli.diffusion.sampling import clip_range_for, draw, draw_unconditional
from diffem_cli.diffusion.schedule import ddpm_scheduler
from diffem_cli.methods.base import Make, Method
from diffem_cli.methods.registry import default_config

TINY_MLP = {"type": "mlp", "width": 16, "depth": 2, "emb_dim": 8}
TINY_UNET = {
    "type": "unet",
    "block_out_channels": [8, 16],
    "norm_num_groups": 8,
    "down_block_types": ["DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D"],
}


@dataclass
class TinyData:
    """Observations held in memory, with what methods read of ``Observations``."""

    channel: Channel
    obs: dict[str, torch.Tensor]
    index: torch.Tensor
    shape: tuple[int, ...]
    kind: str
    value_range: list[float] | None

    def __len__(self) -> int:
        return len(self.index)


def tiny_data(
    channel: Channel, shape: tuple[int, ...], n: int = 6, seed: int = 0
) -> tuple[TinyData, torch.Tensor]:
    """``n`` clean samples uniform in [-1, 1] of ``shape`` and their observations by ``channel``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n, *shape), generator=g) * 2 - 1
    index = torch.arange(n)
    obs = channel.corrupt(x, sample_seeds(seed, index))
    kind = "vector" if len(shape) == 1 else "image"
    return TinyData(channel, obs, index, tuple(shape), kind, [-1.0, 1.0] if kind == "image" else None), x


def _fail(method: Method, what: str) -> AssertionError:
    return AssertionError(f"method {getattr(method, 'name', '?')!r}: {what}")


def _finite(method: Method, what: str, t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t.float()).all()):
        raise _fail(method, f"{what} has non-finite values")


def _declarations(method: Method) -> None:
    cls = type(method)
    if not cls.name or not isinstance(cls.name, str):
        raise _fail(method, "the class needs a non-empty name")
    if not cls.description or "\n" in cls.description:
        raise _fail(method, "the class needs a one-line description")
    if not isinstance(cls.kind, str) or not cls.kind:
        raise _fail(method, "the class needs a kind")
    if set(method.options) != set(cls.option_classes):
        raise _fail(method, f"holds options {sorted(method.options)}, declares {sorted(cls.option_classes)}")


def _round_trip(method: Method, cfg: RunConfig) -> None:
    record = json.loads(json.dumps(method.config_record(cfg)))
    back = type(method).from_record(record)
    if back.options != method.options:
        raise _fail(method, f"options {method.options} come back from a checkpoint as {back.options}")


def _refusals(method: Method, data: TinyData, refuse: Sequence[Channel], seed: int) -> None:
    try:
        method.check(data)
    except DiffemError as e:
        raise _fail(method, f"check refuses the observations it was given ({e})") from None
    if method.accepts(data.channel) is not None:
        raise _fail(method, "accepts() refuses the channel check() accepts")
    for channel in refuse:
        other, _ = tiny_data(channel, data.shape, len(data), seed)
        try:
            method.check(other)
        except DiffemError as e:
            if "\n" in str(e) or not str(e):
                raise _fail(method, f"refuses channel {channel.name!r} without a one-line message") from None
            continue
        raise _fail(method, f"check accepts channel {channel.name!r}, which it should refuse")


def _mstep(
    method: Method, data: TinyData, clean: torch.Tensor, model: torch.nn.Module, cfg: RunConfig
) -> None:
    step = method.mstep(data, clean.clone(), 1, 1, clean, cfg)
    if not step.tensors:
        raise _fail(method, "the M-step gives no tensors")
    rows = {k: len(v) for k, v in step.tensors.items()}
    if len(set(rows.values())) != 1 or 0 in rows.values():
        raise _fail(method, f"the M-step's tensors have unaligned or no rows {rows}")
    for k, v in {**step.tensors, **step.aux}.items():
        _finite(method, f"M-step tensor {k!r}", v)
    if step.refresh is not None:
        for k, v in step.refresh(1).items():
            if k not in step.tensors or v.shape != step.tensors[k].shape:
                raise _fail(method, f"refresh gives {k!r} of shape {tuple(v.shape)}, unlike the M-step's")
    batch = {k: v[:4] for k, v in step.tensors.items()}
    value = step.loss(model.train(), batch, ddpm_scheduler(), torch.Generator().manual_seed(0))
    if not isinstance(value, torch.Tensor) or value.dim() != 0 or not bool(torch.isfinite(value)):
        raise _fail(method, f"the loss is not a finite scalar: {value!r}")


def _posterior(
    method: Method, data: TinyData, model: torch.nn.Module, cfg: RunConfig, seed: int
) -> torch.Tensor:
    post = method.posterior(model.eval(), data, {})
    rows = {**data.obs, **post.extra}
    for k, v in post.extra.items():
        if len(v) != len(data):
            raise _fail(method, f"posterior extra {k!r} has {len(v)} rows for {len(data)} observations")

    def draw_first(make: Make, n: int | torch.Tensor, note: str = "") -> torch.Tensor:
        picked = n.long() if isinstance(n, torch.Tensor) else torch.arange(n)  # row indices, or the first n
        return draw(
            lambda a, b: make({k: v[picked[a:b]] for k, v in rows.items()}),
            len(picked),
            data.shape,
            sampler=cfg.sample.sampler,
            steps=2,
            batch_size=4,
            seed_parts=(seed, 1),
            device=torch.device("cpu"),
            clip_range=clip_range_for(data.kind, data.value_range),
            label=f"check {method.name}",
        )

    make = post.make
    if post.choose is not None:
        make, record = post.choose(draw_first)
        json.dumps(record)
    if make is None:
        raise _fail(method, "the posterior gives neither a denoiser factory nor a way to choose one")
    json.dumps(post.record)
    x = draw_first(make, len(data))
    if tuple(x.shape) != (len(data), *data.shape):
        raise _fail(method, f"posterior samples of shape {tuple(x.shape)} for {len(data)} x {data.shape}")
    _finite(method, "a posterior sample", x)
    return x


def check_method(
    method: Method,
    channel: Channel,
    shape: tuple[int, ...],
    *,
    refuse: Sequence[Channel] = (),
    cfg: RunConfig | None = None,
    n: int = 6,
    seed: int = 0,
) -> None:
    """Check ``method`` against diffem's method contract on ``n`` tiny observations of data of
    ``shape`` through ``channel`` (which it must accept); ``refuse``: channels it must refuse.

    ``cfg`` supplies the run settings the hooks read (seed, ``train``, ``em``); default: every
    option section at its defaults, a tiny network. Raises ``AssertionError`` naming the first
    broken promise; returns None when every check passes.
    """
    shape = tuple(int(s) for s in shape)
    cfg = copy.deepcopy(cfg) if cfg is not None else default_config()
    if not cfg.network:
        cfg.network = dict(TINY_MLP if len(shape) == 1 else TINY_UNET)
    _declarations(method)
    _round_trip(method, cfg)
    data, clean = tiny_data(channel, shape, n, seed)
    _refusals(method, data, refuse, seed)
    spec = method.model_spec(data)
    if spec.kind != type(method).kind or spec.cond_size < 0:
        raise _fail(method, f"model spec {spec} does not match the class kind {type(method).kind!r}")
    torch.manual_seed(seed)
    model = build_network(cfg.network, shape, spec.cond_size)
    _mstep(method, data, clean, model, cfg)
    first = _posterior(method, data, model, cfg, seed)
    if not torch.equal(first, _posterior(method, data, model, cfg, seed)):
        raise _fail(method, "two posterior draws with the same seed differ")
    if spec.kind == "conditional":
        return
    meta: dict[str, Any] = {
        "kind": spec.kind,
        "data": {"shape": list(shape), "kind": data.kind, "value_range": data.value_range},
        "channel": channel.spec(),
        **method.checkpoint_meta(data),
    }
    prior = method.prior(model.eval(), meta, seed)
    quick = dataclasses.replace(cfg.sample, steps=2, batch_size=4)
    x = draw_unconditional(prior.make, meta["data"], 3, quick, seed=seed, device=torch.device("cpu"))
    if tuple(x.shape) != (3, *shape):
        raise _fail(method, f"unconditional samples of shape {tuple(x.shape)}, expected {(3, *shape)}")
    _finite(method, "an unconditional sample", x)
