"""``diffem train-uncond`` and ``diffem sample``: the unconditional model of clean data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diffem_cli.cli.commands._help import config_help
from diffem_cli.cli.commands._options import Corrections, Device, Sampler, Steps, Trackers
from diffem_cli.core.logs import notice


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
            help=config_help(
                "Default: an existing RUN's own (not with --force), else the preset for the data's shape."
            ),
        ),
    ] = None,
    sets: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", metavar="KEY=VALUE", help="Override one key: train.epochs=50."),
    ] = None,
    device: Device = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Start RUN over if it holds another run (removes only what diffem wrote in it)."
        ),
    ] = False,
    log_with: Trackers = None,
) -> None:
    """Train an unconditional diffusion model on reconstructions.

    Re-running on an existing RUN resumes it with the configuration it was started with.
    """
    from diffem_cli.cli.commands._checks import check_run_folder
    from diffem_cli.cli.commands._run_config import config_source, suggest_own_config
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
    source = config_source(run, config, force)
    cfg = load_config(source, sets or [], default_preset=default_preset(shape), extensions=extensions())
    check_config_for_data(cfg, None, shape)
    track = check_trackers(log_with)
    with launch(device) as ctx, suggest_own_config(run, source):
        ckpt = train_uncond(recon, run, cfg, device=device, force=force, log=notice, ctx=ctx, track=track)
        notice(f"[green]done[/green]: {ckpt}", markup=True)


def sample_command(
    ckpt: Annotated[
        Path, typer.Argument(metavar="CKPT", help="Unconditional checkpoint or exported folder.")
    ],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Output datasets folder (column x).")],
    n: Annotated[int, typer.Option("-n", help="Number of samples.")] = 64,
    sampler: Sampler = None,
    steps: Steps = None,
    corrections: Corrections = None,
    batch_size: Annotated[int, typer.Option(help="Samples drawn at once.")] = 4096,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    png: Annotated[Path | None, typer.Option(help="Also write one PNG per image into this folder.")] = None,
    device: Device = None,
    force: Annotated[
        bool,
        typer.Option("--force", help="Replace OUT (and --png) if diffem wrote them; never another folder."),
    ] = False,
) -> None:
    """Draw samples from an unconditional model."""
    from diffem_cli.cli.commands._checks import at_least, given_sampling, need_existing
    from diffem_cli.core.runtime import launch
    from diffem_cli.io.store import check_apart, check_output
    from diffem_cli.pipeline.uncond import sample_unconditional

    at_least("-n", n)
    sampling = given_sampling(sampler, steps, batch_size, corrections)
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
            sample_cfg=sampling,
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
