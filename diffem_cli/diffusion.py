"""The diffusion parameterisation, schedule, training loss and samplers, through diffusers.

One schedule for every model diffem trains (conditional or not): discrete-time VP with 1,000
steps, the cosine ("squaredcos_cap_v2") noise schedule and v-prediction. It is exactly what a
diffusers ``DDPMScheduler`` describes, so an exported unconditional image model samples in
``DDPMPipeline`` with no diffem code. E-step samplers are diffusers schedulers on that schedule:
ancestral DDPM, DDIM and DPM-Solver++ (2M, the default).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from diffem_cli.errors import DiffemError

SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "v_prediction",
}

SAMPLERS = ("dpm++", "ddim", "ddpm")
DEFAULT_SAMPLER = "dpm++"
DEFAULT_STEPS = 32


def ddpm_scheduler(clip_range: float | None = None, **extra: Any) -> Any:
    """The training (and DDPMPipeline) scheduler; ``clip_range`` clips x0 estimates when set."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        **SCHEDULE,
        clip_sample=clip_range is not None,
        clip_sample_range=clip_range or 1.0,
        variance_type="fixed_small",
        **extra,
    )


def sampler_scheduler(name: str, steps: int, clip_range: float | None = None) -> Any:
    """A fresh scheduler for ``name`` (``dpm++``, ``ddim``, ``ddpm``) set to ``steps`` steps."""
    if steps < 1 or steps > SCHEDULE["num_train_timesteps"]:
        raise DiffemError(f"--steps must lie in [1, {SCHEDULE['num_train_timesteps']}], got {steps}")
    if name == "ddpm":
        sched = ddpm_scheduler(clip_range, timestep_spacing="trailing")
    elif name == "ddim":
        from diffusers import DDIMScheduler

        sched = DDIMScheduler(
            **SCHEDULE,
            clip_sample=clip_range is not None,
            clip_sample_range=clip_range or 1.0,
            timestep_spacing="trailing",
            set_alpha_to_one=False,
        )
    elif name == "dpm++":
        from diffusers import DPMSolverMultistepScheduler

        sched = DPMSolverMultistepScheduler(
            **SCHEDULE,
            algorithm_type="dpmsolver++",
            solver_order=2,
            timestep_spacing="trailing",
            lower_order_final=True,
            final_sigmas_type="zero",
            thresholding=False,
        )
    else:
        raise DiffemError(f"unknown sampler {name!r} (choose from {', '.join(SAMPLERS)})")
    sched.set_timesteps(steps)
    return sched


T_SAMPLING = ("uniform", "log-sigma")


def draw_timesteps(
    n: int, scheduler: Any, t_sampling: str, generator: torch.Generator | None
) -> torch.Tensor:
    """Training timesteps: ``uniform`` over the 1,000 steps, or ``log-sigma``: half uniform, half
    with noise levels sigma = sqrt((1 - abar) / abar) log-uniform between the schedule's smallest
    and 10, which spends more of the budget at low noise, where fine structure (thin manifolds,
    sharp posteriors) is learnt, while every step keeps being trained."""
    steps = scheduler.config.num_train_timesteps
    if t_sampling not in T_SAMPLING:
        raise DiffemError(f"unknown train.t_sampling {t_sampling!r} (choose from {', '.join(T_SAMPLING)})")
    t = torch.randint(0, steps, (n,), generator=generator)
    if t_sampling == "uniform":
        return t
    abar = scheduler.alphas_cumprod.double()
    log_sigma = 0.5 * torch.log((1 - abar) / abar)
    lo, hi = float(log_sigma[0]), math.log(10.0)
    target = lo + torch.rand(n, generator=generator, dtype=torch.float64) * (hi - lo)
    pick = torch.rand(n, generator=generator) < 0.5
    return torch.where(pick, torch.searchsorted(log_sigma, target).clamp(0, steps - 1), t)


def training_loss(
    model: nn.Module,
    x0: torch.Tensor,
    cond: torch.Tensor | None,
    scheduler: Any,
    generator: torch.Generator | None,
    t_sampling: str = "uniform",
) -> torch.Tensor:
    """Denoising score matching in v-prediction: mean squared error on ``v`` at uniform timesteps."""
    n = x0.shape[0]
    t = draw_timesteps(n, scheduler, t_sampling, generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    x_t = scheduler.add_noise(x0, noise, t)
    target = scheduler.get_velocity(x0, noise, t)
    pred = model(x_t, t, cond)
    return torch.mean((pred.float() - target.float()) ** 2)


@torch.no_grad()
def sample(
    model: Callable[..., torch.Tensor],
    shape: tuple[int, ...],
    n: int,
    cond: torch.Tensor | None = None,
    *,
    sampler: str = DEFAULT_SAMPLER,
    steps: int = DEFAULT_STEPS,
    generator: torch.Generator | None = None,
    clip_range: float | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Draw ``n`` samples of ``shape`` (conditioned on ``cond`` when given). ``steps`` network
    evaluations are used: DPM-Solver++ (2M) and DDIM are deterministic given the start noise;
    DDPM is ancestral (fresh noise each step, from ``generator``)."""
    sched = sampler_scheduler(sampler, steps, clip_range)
    x = torch.randn((n, *shape), generator=generator).to(device) * sched.init_noise_sigma
    extra = {"generator": generator} if sampler == "ddpm" else {}
    for t in sched.timesteps:
        tt = torch.full((1,), int(t), device=device, dtype=torch.long)
        out = model(sched.scale_model_input(x, t), tt, cond)
        x = sched.step(out.float(), t, x, **extra).prev_sample
    return x
