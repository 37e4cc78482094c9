"""Posterior sampling with a conditional model: the E-step, and ``reconstruct``.

Observations are processed in batches; batch ``b`` draws its noise from a generator seeded by
``(seed, tag, first index of the batch)``, so the same seed and batch size give the same
reconstructions on the same device.
"""

from __future__ import annotations

import torch
from torch import nn

from diffem_channels import Channel, mix_seed
from diffem_cli.config import SampleConfig
from diffem_cli.diffusion import sample
from diffem_cli.progress import progress


def clip_range_for(kind: str, value_range: tuple[float, float] | list[float] | None) -> float | None:
    """x0 estimates are clipped to the data range for images, never for vectors."""
    if kind != "image" or value_range is None:
        return None
    return float(max(abs(value_range[0]), abs(value_range[1])))


@torch.no_grad()
def posterior_samples(
    model: nn.Module,
    channel: Channel,
    obs: dict[str, torch.Tensor],
    shape: tuple[int, ...],
    cfg: SampleConfig,
    *,
    seed: int,
    tag: int = 0,
    device: torch.device,
    clip_range: float | None = None,
    label: str = "E-step",
) -> torch.Tensor:
    """One posterior sample ``x ~ q(x | y_i)`` for every observation in ``obs`` (CPU tensor)."""
    n = len(next(iter(obs.values())))
    model = model.to(device).eval()
    out = torch.empty((n, *shape))
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else torch.autocast("cpu", enabled=False)
    )
    with progress() as bar, autocast:
        task = bar.add_task(label, total=n, info=f"{cfg.sampler}, {cfg.steps} steps")
        for start in range(0, n, cfg.batch_size):
            part = {k: v[start : start + cfg.batch_size] for k, v in obs.items()}
            cond = channel.condition(part, shape).to(device)
            gen = torch.Generator().manual_seed(mix_seed(seed, tag, start))
            x = sample(
                model,
                shape,
                cond.shape[0],
                cond,
                sampler=cfg.sampler,
                steps=cfg.steps,
                generator=gen,
                clip_range=clip_range,
                device=device,
            )
            out[start : start + len(x)] = x.float().cpu()
            bar.update(task, advance=len(x))
    return out
