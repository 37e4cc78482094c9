"""Training a denoiser: AdamW, warm-up then cosine decay, gradient clipping, EMA, resumable.

Used by the EM loop's M-step (conditional model on fresh corruptions of the reconstructions)
and by ``train-uncond``. The loop is flat and device-agnostic; training state (weights, EMA,
optimiser moments, epoch) is saved after every epoch to one safetensors file, so a killed run loses
at most the epoch in progress. Random draws are re-seeded every epoch from ``(seed, epoch)``, so a
resumed run needs no saved random state. Under several processes (a distributed
:class:`~diffem_cli.core.runtime.Context`) the model is wrapped in ``DistributedDataParallel`` and each
global batch is split across the processes.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffem_channels import mix_seed
from diffem_cli.core.checks import bad, choice, finite, int_at_least
from diffem_cli.core.errors import DiffemError
from diffem_cli.core.progress import progress
from diffem_cli.core.runtime import Context, all_mean, autocast, generator, same_on_all
from diffem_cli.diffusion.augment import AUGMENTS, augment_batch, check_augment
from diffem_cli.diffusion.checkpoint import load_tensors, save_tensors
from diffem_cli.diffusion.compiled import COMPILE_MODES, maybe_compile
from diffem_cli.diffusion.losses import T_SAMPLING, Loss, VLoss
from diffem_cli.diffusion.schedule import ddpm_scheduler


class EMA:
    """Exponential moving average of parameters with a warm-up (decay grows as (1+n)/(10+n))."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0
        self._pairs: tuple[nn.Module, list, list, list, list] | None = None

    def _lists(self, model: nn.Module) -> tuple[list, list, list, list]:
        """Parameter and buffer lists of both models, built once per source model (walking the
        module tree every step costs as much as a small network's optimiser step)."""
        if self._pairs is None or self._pairs[0] is not model:
            ema_p = list(self.model.parameters())
            src_p = [p.detach() for p in model.parameters()]
            self._pairs = (model, ema_p, src_p, list(self.model.buffers()), list(model.buffers()))
        return self._pairs[1:]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema_p, src_p, ema_b, src_b = self._lists(model)
        torch._foreach_lerp_(ema_p, src_p, 1.0 - d)
        for b_ema, b in zip(ema_b, src_b, strict=True):
            b_ema.copy_(b)


@dataclass
class TrainResult:
    """What a training phase returns: the EMA model and a summary."""

    ema_model: nn.Module
    steps: int
    last_loss: float
    seconds: float


WARMUP_FRACTION = 0.05


@dataclass
class TrainConfig:
    """One training phase (an M-step, or train-uncond). ``compile``: run the network through
    ``torch.compile`` (``on``, ``off``, or ``auto``: convolutional networks on CUDA); ``augment``:
    flips applied to every batch (:mod:`~diffem_cli.diffusion.augment`)."""

    batch_size: int = 256
    epochs: int = 50
    lr: float = 1e-3
    lr_min: float = 1e-6
    warmup: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    weight_decay: float = 0.0
    t_sampling: str = "uniform"
    compile: str = "auto"
    augment: str = "none"


def validate_train(t: TrainConfig, p: str = "train.") -> None:
    """Check a TrainConfig; ``p`` prefixes the key names in errors."""
    int_at_least(p + "batch_size", t.batch_size, 1)
    int_at_least(p + "epochs", t.epochs, 1)
    int_at_least(p + "warmup", t.warmup, 0)
    if finite(p + "lr", t.lr) <= 0:
        raise bad(p + "lr", t.lr, "> 0")
    if not 0 <= finite(p + "lr_min", t.lr_min) <= t.lr:
        raise bad(p + "lr_min", t.lr_min, f"in [0, train.lr = {t.lr:g}]")
    if finite(p + "grad_clip", t.grad_clip) < 0:
        raise bad(p + "grad_clip", t.grad_clip, ">= 0 (0 turns clipping off)")
    if not 0 <= finite(p + "ema_decay", t.ema_decay) < 1:
        raise bad(p + "ema_decay", t.ema_decay, "in [0, 1)")
    if finite(p + "weight_decay", t.weight_decay) < 0:
        raise bad(p + "weight_decay", t.weight_decay, ">= 0")
    choice(p + "t_sampling", t.t_sampling, T_SAMPLING)
    choice(p + "compile", t.compile, COMPILE_MODES)
    choice(p + "augment", t.augment, AUGMENTS)


def effective_warmup(total: int, cfg: TrainConfig) -> int:
    """``cfg.warmup`` capped at 5% of the phase's ``total`` steps, so a short run is not all warm-up."""
    return min(cfg.warmup, int(WARMUP_FRACTION * total))


def lr_at(step: int, total: int, cfg: TrainConfig, warmup: int | None = None) -> float:
    """Linear warm-up to ``lr`` over ``warmup`` steps (default ``cfg.warmup``), then cosine decay
    to ``lr_min`` at ``total`` steps."""
    warmup = cfg.warmup if warmup is None else warmup
    if warmup > 0 and step < warmup:
        return cfg.lr * (step + 1) / warmup
    span = max(1, total - warmup)
    frac = min(1.0, (step - warmup) / span)
    return cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1 + math.cos(math.pi * frac))


def _state_tensors(model: nn.Module, ema: EMA, opt: torch.optim.Optimizer) -> dict:
    out = {f"model.{k}": v for k, v in model.state_dict().items()}
    out.update({f"ema.{k}": v for k, v in ema.model.state_dict().items()})
    for i, p in enumerate(model.parameters()):
        st = opt.state.get(p, {})
        for name, value in st.items():
            out[f"opt.{i}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return out


def _restore(
    path: Path,
    tag: dict[str, Any],
    model: nn.Module,
    ema: EMA,
    opt: torch.optim.Optimizer,
    log: Callable[[str], None],
) -> tuple[int, int, float] | None:
    """Load a saved training state whose tag matches; returns (epoch, step, last loss) or None."""
    if not path.exists():
        return None
    try:
        tensors, meta = load_tensors(path)
    except DiffemError as e:
        log(f"training state {path} is unreadable ({e}); this phase restarts from epoch 0")
        return None
    if meta.get("tag") != tag:
        log(f"training state {path} belongs to another phase; this phase starts from epoch 0")
        return None
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    ema.model.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    ema.updates = int(meta["ema_updates"])
    params = list(model.parameters())
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, i, name = key.split(".", 2)
            opt.state[params[int(i)]][name] = value.to(params[int(i)].device)
    return int(meta["epoch"]), int(meta["step"]), float(meta.get("loss", "nan"))


def train_denoiser(
    model: nn.Module,
    data: dict[str, torch.Tensor],
    cfg: TrainConfig,
    *,
    loss: Loss | None = None,
    seed: int,
    device: torch.device,
    state_path: Path | None = None,
    tag: dict[str, Any] | None = None,
    label: str = "M-step",
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    refresh: Callable[[int], dict[str, torch.Tensor]] | None = None,
    refresh_every: int = 0,
    log: Callable[[str], None] | None = None,
    ctx: Context | None = None,
) -> TrainResult:
    """Train ``model`` for ``cfg.epochs`` on the rows of ``data`` (aligned tensors, e.g. ``x`` and
    ``cond``), each batch scored by ``loss`` (default :class:`~diffem_cli.diffusion.losses.VLoss`).

    The data stay on ``device`` for the whole phase. Epoch ``e``'s permutation comes from a
    generator seeded by ``(seed, e)`` and its timesteps and noise from one seeded by
    ``(seed, e, rank)``. With
    ``refresh`` and ``refresh_every > 0``, columns are replaced by ``refresh(r)`` at the start of
    every ``refresh_every``-th epoch (round ``r``): fresh corruptions within a lap. With
    ``cfg.augment``, each batch's rows are flipped (every column alike) by draws from the same
    generator.

    Resumes from ``state_path`` when it holds a state with the same ``tag``. Returns the EMA
    model; raises DiffemError on a non-finite loss (nothing is saved from a diverged step).

    Under a distributed ``ctx`` (pass the same ``state_path`` on every rank, on a shared file
    system): every rank loads the same state, the model is wrapped in ``DistributedDataParallel``,
    rank ``r`` trains on its slice of each global batch of ``cfg.batch_size`` rows (all ranks slice
    the same permutation) with its own noise, the epoch loss is averaged over ranks, and only the
    main rank saves the state, shows progress and calls ``on_epoch``.
    """
    log = log or (lambda _msg: None)
    ctx = ctx or Context(0, 1, device)
    main = ctx.is_main
    loss_fn = loss if loss is not None else VLoss(cfg.t_sampling)
    n = len(next(iter(data.values())))
    if n == 0:
        raise DiffemError("no training samples")
    check_augment(cfg.augment, data)
    model = model.to(device).train()
    ema = EMA(model, cfg.ema_decay)
    params = list(model.parameters())
    # foreach: one fused kernel per operation over all parameters (the default only on CUDA);
    # the same arithmetic per element, so CPU results are bitwise those of the per-tensor loop
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    sched = ddpm_scheduler()
    bs = min(cfg.batch_size, n)
    if bs < ctx.world:
        raise DiffemError(f"{label}: a batch of {bs} rows cannot be split across {ctx.world} processes")
    per_epoch = n // bs
    total = per_epoch * cfg.epochs
    warmup = effective_warmup(total, cfg)
    if warmup < cfg.warmup and main:
        log(f"{label}: warm-up capped at {warmup} of {total} steps (train.warmup={cfg.warmup})")
    tag = tag or {}
    start_epoch, step, loss_value = 0, 0, float("nan")
    if state_path is not None:
        restored = _restore(state_path, tag, model, ema, opt, log if main else (lambda _msg: None))
        if restored:
            start_epoch, step, loss_value = restored
    if not same_on_all(start_epoch, ctx):
        raise DiffemError(f"{label}: the processes found different training states in {state_path}")
    net, share = maybe_compile(_data_parallel(model, ctx), cfg.compile, device), _share(bs, ctx)
    on_dev = {k: v.to(device) for k, v in data.items()}
    t0 = time.perf_counter()
    with progress() if main else contextlib.nullcontext() as bar:
        task = bar.add_task(label, total=total, completed=step, info="") if main else None
        for epoch in range(start_epoch, cfg.epochs):
            if (
                refresh is not None
                and refresh_every > 0
                and epoch // refresh_every > 0
                and (epoch % refresh_every == 0 or epoch == start_epoch)
            ):
                on_dev.update({k: v.to(device) for k, v in refresh(epoch // refresh_every).items()})
            order = generator(device, mix_seed(seed, epoch))
            gen = generator(device, mix_seed(seed, epoch, ctx.rank))
            perm = torch.randperm(n, generator=order, device=device)[: per_epoch * bs].view(per_epoch, bs)
            perm = perm[:, share[0] : share[1]]
            running = torch.zeros((), device=device)
            for idx in perm:
                for group in opt.param_groups:
                    group["lr"] = lr_at(step, total, cfg, warmup)
                with autocast(device):
                    batch = {k: v.index_select(0, idx) for k, v in on_dev.items()}
                    batch = augment_batch(batch, cfg.augment, gen)
                    value = loss_fn(net, batch, sched, gen)
                if share[2] != 1.0:  # DDP averages over ranks: weigh by rows so it is the batch mean
                    value = value * share[2]
                opt.zero_grad(set_to_none=True)
                value.backward()
                if cfg.grad_clip > 0:
                    nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                ema.update(model)
                running += value.detach()
                step += 1
            loss_value = float(all_mean(running, ctx)) / per_epoch
            if not math.isfinite(loss_value):
                raise DiffemError(f"{label}: loss became {loss_value} in epoch {epoch + 1}; lower train.lr")
            if main:
                bar.update(task, completed=step, info=f"loss {loss_value:.4f}")
            if state_path is not None and main:
                meta = {
                    "tag": tag,
                    "epoch": epoch + 1,
                    "step": step,
                    "ema_updates": ema.updates,
                    "loss": loss_value,
                }
                save_tensors(state_path, _state_tensors(model, ema, opt), meta)
            if on_epoch is not None and main:
                on_epoch(
                    {
                        "epoch": epoch + 1,
                        "step": step,
                        "loss": loss_value,
                        "lr": opt.param_groups[0]["lr"],
                        "seconds": time.perf_counter() - t0,
                    }
                )
    return TrainResult(ema.model.cpu(), step, loss_value, time.perf_counter() - t0)


def _data_parallel(model: nn.Module, ctx: Context) -> nn.Module:
    """``model`` itself for one process, else wrapped in DistributedDataParallel (which broadcasts
    rank 0's weights and averages gradients in the backward pass)."""
    if not ctx.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, output_device=ids[0] if ids else None)


def _share(bs: int, ctx: Context) -> tuple[int, int, float]:
    """This rank's columns ``[lo, hi)`` of a global batch of ``bs`` rows, and the factor that makes
    DDP's average of per-rank means the mean over the whole batch (1 when ``bs`` divides evenly)."""
    lo, hi = bs * ctx.rank // ctx.world, bs * (ctx.rank + 1) // ctx.world
    return lo, hi, (hi - lo) * ctx.world / bs
