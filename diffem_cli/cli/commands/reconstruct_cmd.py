"""``diffem reconstruct``: posterior samples for every observation from a conditional checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diffem_cli.cli.commands._options import Corrections, Device, Sampler, Steps
from diffem_cli.core.errors import DiffemError
from diffem_cli.core.logs import notice


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
    out: Annotated[
        Path,
        typer.Argument(
            metavar="OUT",
            help="Output datasets folder (columns x, index, sample, and the observations' file_name "
            "and label).",
        ),
    ],
    sampler: Sampler = None,
    steps: Steps = None,
    corrections: Corrections = None,
    per_observation: Annotated[int, typer.Option(help="Posterior samples per observation.")] = 1,
    batch_size: Annotated[int, typer.Option(help="Observations sampled at once.")] = 4096,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    png: Annotated[
        Path | None,
        typer.Option(
            help="Also write the reconstructions as PNG grids of up to 64 into this folder, one "
            "posterior draw per grid, each image captioned with its observation's index "
            "(FIRST_LAST_drawD.png).",
        ),
    ] = None,
    png_single: Annotated[
        bool,
        typer.Option(
            "--png-single",
            help="With --png: one PNG per reconstruction instead of grids, named INDEX_DRAW.png "
            "(INDEX_DRAW_NAME.png after the observation's source file when it has one).",
        ),
    ] = False,
    device: Device = None,
    force: Annotated[
        bool,
        typer.Option("--force", help="Replace OUT (and --png) if diffem wrote them; never another folder."),
    ] = False,
) -> None:
    """Sample reconstructions x ~ q(x|y) of every observation."""
    from diffem_cli.cli.commands._checks import at_least, check_observations, given_sampling, need_existing
    from diffem_cli.core.runtime import launch
    from diffem_cli.io.store import check_apart, check_output, read_dataset
    from diffem_cli.pipeline.reconstruct import reconstruct

    sampling = given_sampling(sampler, steps, batch_size, corrections)
    at_least("--per-observation", per_observation)
    if png_single and png is None:
        raise DiffemError("--png-single needs --png DIR: the folder the PNGs go to")
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
            sample=sampling,
            per_observation=per_observation,
            seed=seed,
            png_dir=png,
            png_single=png_single,
            device=device,
            force=force,
            ctx=ctx,
        )
        notice(f"wrote {info['rows']} reconstructions to {out} ({info['sampler']}, {info['steps']} steps)")


def register(app: typer.Typer) -> None:
    app.command("reconstruct")(reconstruct_command)
