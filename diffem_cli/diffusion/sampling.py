"""The one sampling loop: unconditional samples, E-steps, ``reconstruct`` and guided sampling.

:func:`sample_loop` runs a diffusers scheduler (DPM-Solver++ 2M, DDIM or ancestral DDPM) on a
:class:`~diffem_cli.diffusion.denoise.Denoiser`: the scheduler is given x0 estimates
(``prediction_type="sample"``), clipped to the data range when ``clip_range`` is set, the same
way for every sampler. With ``corrections > 0`` every step is followed by that many Langevin
corrections at the new noise level (a predictor-corrector sampler, as the official EM-MMPS manifold
run uses): ``x <- x + tau (alpha x0(x) - x) + sigma sqrt(2 tau) eps``, a Langevin step of size
``tau sigma^2`` on the (guided) score ``(alpha x0 - x) / sigma^2``, one more denoiser evaluation
each. :func:`draw` runs it over many samples in batches: batch ``b`` draws its
noise from a generator seeded by ``(seed parts..., first index of the batch)``, so results do
not depend on which process draws which batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from diffem_channels import mix_seed
from diffem_cli.core.checks import bad, choice, finite, int_at_least
from diffem_cli.core.progress import progress
from diffem_cli.core.runtime import Context
from diffem_cli.diffusion.compiled import COMPILE_MODES
from diffem_cli.diffusion.denoise import Denoiser, NetworkDenoiser
from diffem_cli.diffusion.schedule import SAMPLERS, SCHEDULE, SPACINGS, sampler_scheduler


@dataclass
class SampleConfig:
    """How reconstructions and samples are drawn: ``corrections`` Langevin corrections of step
    ``corrector_tau`` after each step make it a predictor-corrector sampler. ``keep_observed``:
    posterior samples keep ``y`` on the entries a noiseless channel gives exactly
    (``Channel.exact_entries``), and conditional models train on the other entries only.
    ``compile``: run the network through ``torch.compile`` (``on``, ``off``, or ``auto``:
    convolutional networks on CUDA). ``spacing``: where the steps fall
    (:data:`~diffem_cli.diffusion.schedule.SPACINGS`).
    ``project``: posterior samples end with a projection onto ``{x : A x = y}`` (linear channels:
    exact data consistency where the channel is noiseless)."""

    sampler: str = "dpm++"
    steps: int = 32
    batch_size: int = 4096
    corrections: int = 0
    corrector_tau: float = 0.1
    keep_observed: bool = True
    compile: str = "auto"
    spacing: str = "trailing"
    project: bool = False


def validate_sample(s: SampleConfig, prefix: str = "sample.") -> None:
    """Check a SampleConfig (sampler name, steps in [1, 1000], batch size >= 1); ``prefix`` "--"
    names the fields as the command-line options that set them."""
    choice(prefix + "sampler", s.sampler, tuple(SAMPLERS))
    choice(prefix + "compile", s.compile, COMPILE_MODES)
    choice(prefix + "spacing", s.spacing, SPACINGS)
    if s.spacing == "linspace" and s.sampler == "ddim":
        raise bad(prefix + "spacing", s.spacing, "with sampler dpm++ or ddpm (ddim takes trailing steps)")
    int_at_least(prefix + "steps", s.steps, 1, SCHEDULE["num_train_timesteps"])
    int_at_least(prefix + "batch_size", s.batch_size, 1)
    int_at_least(prefix + "corrections", s.corrections, 0, 16)
    if not 0 < finite(prefix + "corrector_tau", s.corrector_tau) <= 1:
        raise bad(prefix + "corrector_tau", s.corrector_tau, "in (0, 1]")


def clip_range_for(kind: str, value_range: tuple[float, float] | list[float] | None) -> float | None:
    """x0 estimates are clipped to the data range for images, never for vectors."""
    if kind != "image" or value_range is None:
        return None
    return float(max(abs(value_range[0]), abs(value_range[1])))


def sample_nfe(steps: int, corrections: int = 0) -> int:
    """Denoiser evaluations per sample of :func:`sample_loop`: every step, plus the corrections
    after all but the last."""
    return steps + corrections * (steps - 1)


def sample_loop(
    denoiser: Denoiser,
    noise: torch.Tensor,
    *,
    sampler: str,
    steps: int,
    generator: torch.Generator | None = None,
    clip_range: float | None = None,
    corrections: int = 0,
    corrector_tau: float = 0.1,
    spacing: str = "trailing",
) -> torch.Tensor:
    """Integrate from pure noise ``noise`` to samples with ``steps * (1 + corrections)``
    denoiser evaluations (no correction after the last step).

    Autograd is enabled only when ``denoiser.needs_grad``; the samples carry no graph.
    """
    sched = sampler_scheduler(sampler, steps, spacing)
    x = noise * sched.init_noise_sigma
    extra = {"generator": generator} if sampler == "ddpm" else {}
    grad = torch.enable_grad() if denoiser.needs_grad else torch.no_grad()

    def estimate(x: torch.Tensor, t: int) -> torch.Tensor:
        with grad:
            x0 = denoiser(x.detach(), t)
        x0 = x0.detach().float()
        return x0 if clip_range is None else x0.clamp(-clip_range, clip_range)

    timesteps = [int(t) for t in sched.timesteps]
    for i, t in enumerate(sched.timesteps):
        x0 = estimate(x, int(t))
        with torch.no_grad():
            x = sched.step(x0, t, x, **extra).prev_sample
        if i + 1 < len(timesteps):
            x = _correct(estimate, x, timesteps[i + 1], corrections, corrector_tau, generator)
    return x.detach()


def _correct(
    estimate: Callable[[torch.Tensor, int], torch.Tensor],
    x: torch.Tensor,
    t: int,
    corrections: int,
    tau: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """``corrections`` Langevin steps at timestep ``t`` (module docstring)."""
    from diffem_cli.diffusion.denoise import alpha_sigma

    a, s = alpha_sigma(t)
    for _ in range(corrections):
        eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = x + tau * (a * estimate(x, t) - x) + s * (2.0 * tau) ** 0.5 * eps
    return x


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
    corrections: int = 0,
    corrector_tau: float = 0.1,
    spacing: str = "trailing",
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
        info = f"{sampler}, {steps} steps" + (f" x {1 + corrections} (corrector)" if corrections else "")
        task = bar.add_task(label, total=n, info=info) if show else None
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
                corrections=corrections,
                corrector_tau=corrector_tau,
                spacing=spacing,
            )
            out[start:stop] = x.float().cpu()
            if show:  # the main process shows everyone's progress, assuming equal speed
                done = min(n, done + (stop - start) * world)
                bar.update(task, completed=done)
    if ctx is not None and ctx.distributed:
        from diffem_cli.core.runtime import gather_rows

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
        corrections=sample.corrections,
        corrector_tau=sample.corrector_tau,
        spacing=sample.spacing,
    )


def sample_tensors(
    model: nn.Module,
    meta: dict[str, Any],
    n: int,
    cfg: SampleConfig,
    *,
    seed: int,
    device: torch.device,
    ctx: Context | None = None,
) -> torch.Tensor:
    """``n`` unconditional samples, in batches of ``cfg.batch_size``, seeded per batch."""
    denoiser = NetworkDenoiser(model.to(device).eval())
    return draw_unconditional(
        lambda _start, _stop: denoiser, meta["data"], n, cfg, seed=seed, device=device, ctx=ctx
    )
