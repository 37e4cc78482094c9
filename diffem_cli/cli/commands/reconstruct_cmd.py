"""``diffem reconstruct``: posterior samples for every observation from a conditional checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diffem_cli.core.progress import console
from diffem_cli.diffusion.schedule import DEFAULT_SAMPLER, DEFAULT_STEPS


def reconstruct_command(
    ckpt: Annotated[
        Path,
        typer.Argument(
            metavar="CKPT", help="Conditional checkpoint (lap_NNN.safetensors) or exported folder."
        ),
    ],
    data: Annotated[
        Path, typer.Argument(metavar="DATA", help="Observations folder written by 'diffem corrupt'.")
    ],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Output datasets folder (columns x, index).")],
    sampler: Annotated[
        str, typer.Option(help="dpm++ (default), ddim or ddpm (ancestral).")
    ] = DEFAULT_SAMPLER,
    steps: Annotated[int, typer.Option(help="Sampler steps = network evaluations.")] = DEFAULT_STEPS,
    per_observation: Annotated[int, typer.Option(help="Posterior samples per observation.")] = 1,
    batch_size: Annotated[int, typer.Option(help="Observations sampled at once.")] = 4096,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    png: Annotated[
        Path | None, typer.Option(help="Also write one PNG per reconstruction into this folder.")
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N.")] = None,
    force: Annotated[bool, typer.Option(help="Overwrite OUT (and --png) if they exist.")] = False,
) -> None:
    """Sample clean reconstructions x ~ q(x|y) for every observation."""
    from diffem_cli.cli.commands._checks import (
        at_least,
        check_observations,
        check_sample_options,
        need_existing,
    )
    from diffem_cli.core.runtime import launch
    from diffem_cli.diffusion.sampling import SampleConfig
    from diffem_cli.io.store import check_apart, check_output, read_dataset
    from diffem_cli.pipeline.reconstruct import reconstruct

    check_sample_options(sampler, steps, batch_size)
    at_least("--per-observation", per_observation)
    need_existing(ckpt, "checkpoint")
    ds, manifest = read_dataset(data)
    check_observations(ds, manifest, data)
    check_output(out, force, [ckpt, data])
    if png is not None:
        check_output(png, force, [ckpt, data])
        check_apart(png, [out], "output")

    with launch(device) as ctx:
        info = reconstruct(
            ckpt,
            data,
            out,
            sample=SampleConfig(sampler, steps, batch_size),
            per_observation=per_observation,
            seed=seed,
            png_dir=png,
            device=device,
            force=force,
            ctx=ctx,
        )
        console.print(f"wrote {info['rows']} reconstructions to {out} ({sampler}, {steps} steps)")


def register(app: typer.Typer) -> None:
    app.command("reconstruct")(reconstruct_command)
