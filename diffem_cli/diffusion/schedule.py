"""The diffusion parameterisation, schedule, training loss and samplers, through diffusers.

One schedule for every model diffem trains (conditional or not): discrete-time VP with 1,000
steps, the cosine ("squaredcos_cap_v2") noise schedule and v-prediction. It is exactly what a
diffusers ``DDPMScheduler`` describes, so an exported unconditional image model samples in
``DDPMPipeline`` with no diffem code. E-step samplers are diffusers schedulers on that schedule:
ancestral DDPM, DDIM and DPM-Solver++ (2M, the default), run by :mod:`diffem_cli.diffusion.sampling`.
"""

from __future__ import annotations

from typing import Any

from diffem_cli.core.errors import DiffemError

SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "v_prediction",
}

SAMPLERS = ("dpm++", "ddim", "ddpm")
SPACINGS = ("trailing", "linspace")
"""Where a sampler's timesteps fall: ``trailing`` (evenly from the last training step down, so the
last network evaluation is at step ``1000 / steps``, a noise level that grows as steps shrink) or
``linspace`` (DPM-Solver++ and DDPM: evenly from the last step to step 0, so the last evaluation
is at the smallest noise level whatever the step count)."""


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


def sampler_scheduler(name: str, steps: int, spacing: str = "trailing") -> Any:
    """A fresh scheduler for ``name`` (``dpm++``, ``ddim``, ``ddpm``) set to ``steps`` steps
    placed by ``spacing`` (:data:`SPACINGS`).

    Samplers are fed x0 estimates (``prediction_type="sample"``) by the sampling loop, which
    clips them itself, so guidance and clipping work the same way for every sampler.
    """
    if steps < 1 or steps > SCHEDULE["num_train_timesteps"]:
        raise DiffemError(f"--steps must lie in [1, {SCHEDULE['num_train_timesteps']}], got {steps}")
    if spacing not in SPACINGS or (spacing == "linspace" and name == "ddim"):
        raise DiffemError(
            f"sample.spacing {spacing!r} is not one of {', '.join(SPACINGS)} "
            "(linspace: dpm++ and ddpm; diffusers' DDIM steps assume even trailing steps)"
        )
    if steps == 1:  # one step starts from pure noise at the last training step either way
        spacing = "trailing"
    schedule = {**SCHEDULE, "prediction_type": "sample"}
    if name == "ddpm":
        from diffusers import DDPMScheduler

        sched = DDPMScheduler(
            **schedule, clip_sample=False, variance_type="fixed_small", timestep_spacing=spacing
        )
    elif name == "ddim":
        from diffusers import DDIMScheduler

        sched = DDIMScheduler(**schedule, clip_sample=False, timestep_spacing=spacing, set_alpha_to_one=False)
    elif name == "dpm++":
        from diffusers import DPMSolverMultistepScheduler

        sched = DPMSolverMultistepScheduler(
            **schedule,
            algorithm_type="dpmsolver++",
            solver_order=2,
            timestep_spacing="trailing",
            lower_order_final=True,
            final_sigmas_type="zero",
            thresholding=False,
        )
    else:
        raise DiffemError(f"unknown sampler {name!r} (choose from {', '.join(SAMPLERS)})")
    if spacing == "linspace":  # evenly from the last step to step 0 (DPM++'s own stops short)
        last = SCHEDULE["num_train_timesteps"] - 1
        sched.set_timesteps(timesteps=[round(last * (1 - i / (steps - 1))) for i in range(steps)])
    else:
        sched.set_timesteps(steps)
    return sched
