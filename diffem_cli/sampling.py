"""The one sampling loop: unconditional samples, E-steps, ``reconstruct`` and guided sampling.

:func:`sample_loop` runs a diffusers scheduler (DPM-Solver++ 2M, DDIM or ancestral DDPM) on a
:class:`~diffem_cli.denoise.Denoiser`: the scheduler is given x0 estimates
(``prediction_type="sample"``), clipped to the data range when ``clip_range`` is set, the same
way for every sampler. :func:`draw` runs it over many samples in batches: batch ``b`` draws its
noise from a generator seeded by ``(seed parts..., first index of the batch)``, so results do
not depend on which process draws which batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from diffem_channels import mix_seed
from diffem_cli.denoise import Denoiser
from diffem_cli.diffusion import sampler_scheduler
from diffem_cli.progress import progress
from diffem_cli.runtime import Context

if TYPE_CHECKING:
    from diffem_cli.config import SampleConfig


def clip_range_for(kind: str, value_range: tuple[float, float] | list[float] | None) -> float | None:
    """x0 estimates are clipped to the data range for images, never for vectors."""
    if kind != "image" or value_range is None:
        return None
    return float(max(abs(value_range[0]), abs(value_range[1])))


def sample_loop(
    denoiser: Denoiser,
    noise: torch.Tensor,
    *,
    sampler: str,
    steps: int,
    generator: torch.Generator | None = None,
    clip_range: float | None = None,
) -> torch.Tensor:
    """Integrate from pure noise ``noise`` to samples with ``steps`` denoiser evaluations.

    Autograd is enabled only when ``denoiser.needs_grad``; the samples carry no graph.
    """
    sched = sampler_scheduler(sampler, steps)
    x = noise * sched.init_noise_sigma
    extra = {"generator": generator} if sampler == "ddpm" else {}
    grad = torch.enable_grad() if denoiser.needs_grad else torch.no_grad()
    for t in sched.timesteps:
        with grad:
            x0 = denoiser(x.detach(), int(t))
        x0 = x0.detach().float()
        if clip_range is not None:
            x0 = x0.clamp(-clip_range, clip_range)
        with torch.no_grad():
            x = sched.step(x0, t, x, **extra).prev_sample
    return x.detach()


def draw(
    make_denoiser: Callable[[int, int], Denoiser],
    n: int,
    shape: tuple[int, ...],
    *,
    sampler: str,
    steps: int,
    batch_size: int,
    seed_parts: tuple[int, ...],
    device: torch.device,
    clip_range: float | None = None,
    label: str = "sample",
    ctx: Context | None = None,
) -> torch.Tensor:
    """``n`` samples (CPU tensor), ``batch_size`` at a time; ``make_denoiser(start, stop)`` gives
    the denoiser of rows ``start:stop`` (their conditioning or observations).

    Under a multi-process ``ctx``, rank ``r`` draws the batches ``r, r + world, ...`` and the
    rows are gathered, so every rank returns all ``n`` samples, equal to a one-process run's
    up to kernel rounding.
    """
    out = torch.zeros((n, *shape))
    starts = list(range(0, n, batch_size))
    mine = starts if ctx is None or not ctx.distributed else starts[ctx.rank :: ctx.world]
    show = ctx is None or ctx.is_main
    world = 1 if ctx is None else ctx.world
    done = 0
    with progress() if show else contextlib.nullcontext() as bar:
        task = bar.add_task(label, total=n, info=f"{sampler}, {steps} steps") if show else None
        for start in mine:
            stop = min(start + batch_size, n)
            gen = torch.Generator(device=device).manual_seed(mix_seed(*seed_parts, start))
            noise = torch.randn((stop - start, *shape), generator=gen, device=device)
            x = sample_loop(
                make_denoiser(start, stop),
                noise,
                sampler=sampler,
                steps=steps,
                generator=gen,
                clip_range=clip_range,
            )
            out[start:stop] = x.float().cpu()
            if show:  # the main process shows everyone's progress, assuming equal speed
                done = min(n, done + (stop - start) * world)
                bar.update(task, completed=done)
    if ctx is not None and ctx.distributed:
        from diffem_cli.runtime import gather_rows

        out = gather_rows(out, starts, batch_size, ctx)
    return out


def draw_unconditional(
    make_denoiser: Callable[[int, int], Denoiser],
    data: dict,
    n: int,
    sample: SampleConfig,
    *,
    seed: int,
    device: torch.device,
    label: str = "sample",
    ctx: Context | None = None,
) -> torch.Tensor:
    """``n`` unconditional samples of a checkpoint's data (``meta["data"]``: shape, kind, value
    range) with ``sample``'s sampler, batch ``b`` seeded by ``(seed, first index)``."""
    return draw(
        make_denoiser,
        n,
        tuple(data["shape"]),
        sampler=sample.sampler,
        steps=sample.steps,
        batch_size=sample.batch_size,
        seed_parts=(seed,),
        device=device,
        clip_range=clip_range_for(data["kind"], data.get("value_range")),
        label=label,
        ctx=ctx,
    )
