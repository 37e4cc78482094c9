"""``diffem train-uncond`` and ``diffem sample``: the unconditional model of clean data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diffem_cli.cli.commands._help import config_help
from diffem_cli.cli.commands.reconstruct_cmd import CHECKPOINT_DEFAULT
from diffem_cli.core.logs import notice
from diffem_cli.core.tracking import LOG_HELP


def train_uncond_command(
    recon: Annotated[
        Path,
        typer.Argument(metavar="RECON", help="Reconstructions: a 'reconstruct' output or RUN/recon/lap_NNN."),
    ],
    run: Annotated[
        Path,
        typer.Argument(metavar="RUN", help="RUN folder for the unconditional model (resumed if it exists)."),
    ],
    config: Annotated[
        str | None,
        typer.Option(
            "--config",
            "-c",
            metavar="PRESET|FILE|RUN",
            help=config_help("Default: the preset for the data's shape."),
        ),
    ] = None,
    sets: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", metavar="KEY=VALUE", help="Override one key: train.epochs=50."),
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Start RUN over if it holds another run.")] = False,
    log_with: Annotated[
        list[str] | None, typer.Option("--log", "--log-with", metavar="TRACKER", help=LOG_HELP)
    ] = None,
) -> None:
    """Train an unconditional diffusion model on reconstructions."""
    from diffem_cli.cli.commands._checks import check_run_folder
    from diffem_cli.config.run import check_config_for_data, default_preset, load_config
    from diffem_cli.core.errors import DiffemError
    from diffem_cli.core.runtime import launch
    from diffem_cli.core.tracking import check_trackers
    from diffem_cli.io.store import check_manifest_columns, columns, read_dataset
    from diffem_cli.methods import extensions
    from diffem_cli.pipeline.uncond import train_uncond

    ds, manifest = read_dataset(recon)
    check_manifest_columns(ds, manifest, recon)
    check_run_folder(run, [recon])
    if "x" not in ds.column_names:
        raise DiffemError(f"{recon} has no column 'x' (columns: {', '.join(ds.column_names)})")
    shape = tuple(columns(ds, ["x"], 0, 1)["x"].shape[1:])
    cfg = load_config(config, sets or [], default_preset=default_preset(shape), extensions=extensions())
    check_config_for_data(cfg, None, shape)
    track = check_trackers(log_with)
    with launch(device) as ctx:
        ckpt = train_uncond(recon, run, cfg, device=device, force=force, log=notice, ctx=ctx, track=track)
        notice(f"[green]done[/green]: {ckpt}", markup=True)


def sample_command(
    ckpt: Annotated[
        Path, typer.Argument(metavar="CKPT", help="Unconditional checkpoint or exported folder.")
    ],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Output datasets folder (column x).")],
    n: Annotated[int, typer.Option("-n", help="Number of samples.")] = 64,
    sampler: Annotated[str | None, typer.Option(help=f"dpm++, ddim or ddpm. {CHECKPOINT_DEFAULT}")] = None,
    steps: Annotated[
        int | None, typer.Option(help=f"Sampler steps = network evaluations. {CHECKPOINT_DEFAULT}")
    ] = None,
    corrections: Annotated[
        int | None, typer.Option(help=f"Langevin corrections after each step. {CHECKPOINT_DEFAULT}")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Samples drawn at once.")] = 4096,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    png: Annotated[Path | None, typer.Option(help="Also write one PNG per image into this folder.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite OUT (and --png) if they exist.")] = False,
) -> None:
    """Draw samples from an unconditional model."""
    from diffem_cli.cli.commands._checks import at_least, check_sample_options, given_sampling, need_existing
    from diffem_cli.core.runtime import launch
    from diffem_cli.io.store import check_apart, check_output
    from diffem_cli.pipeline.uncond import sample_unconditional

    at_least("-n", n)
    check_sample_options(sampler, steps, batch_size, corrections)
    need_existing(ckpt, "checkpoint")
    check_output(out, force, [ckpt])
    if png is not None:
        check_output(png, force, [ckpt])
        check_apart(png, [out], "output")

    with launch(device) as ctx:
        sample_unconditional(
            ckpt,
            out,
            n,
            sample_cfg=given_sampling(sampler, steps, batch_size, corrections),
            seed=seed,
            png_dir=png,
            device=device,
            force=force,
            ctx=ctx,
        )
        notice(f"wrote {n} samples to {out}")


def register(app: typer.Typer) -> None:
    app.command("train-uncond")(train_uncond_command)
    app.command("sample")(sample_command)
