"""``diffem train-uncond`` and ``diffem sample``: the unconditional model of clean data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diffem_cli.core.progress import console
from diffem_cli.diffusion.schedule import DEFAULT_SAMPLER, DEFAULT_STEPS


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
        typer.Option("--config", "-c", help="Preset (manifold, digits, cifar10, celeba) or a YAML file."),
    ] = None,
    sets: Annotated[
        list[str] | None, typer.Option("--set", "-s", help="Override one key: train.epochs=50.")
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N.")] = None,
    force: Annotated[bool, typer.Option(help="Start RUN over if it holds another run.")] = False,
) -> None:
    """Train an unconditional diffusion model on reconstructions."""
    from diffem_cli.cli.commands._checks import check_run_folder
    from diffem_cli.config.run import check_config_for_data, default_preset, load_config
    from diffem_cli.core.errors import DiffemError
    from diffem_cli.core.runtime import launch
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
    with launch(device) as ctx:
        log = lambda s: console.print(s, soft_wrap=True)  # noqa: E731
        ckpt = train_uncond(recon, run, cfg, device=device, force=force, log=log, ctx=ctx)
        console.print(f"[green]done[/green]: {ckpt}")


def sample_command(
    ckpt: Annotated[
        Path, typer.Argument(metavar="CKPT", help="Unconditional checkpoint or exported folder.")
    ],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Output datasets folder (column x).")],
    n: Annotated[int, typer.Option("-n", help="Number of samples.")] = 64,
    sampler: Annotated[str, typer.Option(help="dpm++ (default), ddim or ddpm.")] = DEFAULT_SAMPLER,
    steps: Annotated[int, typer.Option(help="Sampler steps = network evaluations.")] = DEFAULT_STEPS,
    batch_size: Annotated[int, typer.Option(help="Samples drawn at once.")] = 4096,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    png: Annotated[Path | None, typer.Option(help="Also write one PNG per image into this folder.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N.")] = None,
    force: Annotated[bool, typer.Option(help="Overwrite OUT (and --png) if they exist.")] = False,
) -> None:
    """Draw samples from an unconditional model."""
    from diffem_cli.cli.commands._checks import at_least, check_sample_options, need_existing
    from diffem_cli.core.runtime import launch
    from diffem_cli.diffusion.sampling import SampleConfig
    from diffem_cli.io.store import check_apart, check_output
    from diffem_cli.pipeline.uncond import sample_unconditional

    at_least("-n", n)
    check_sample_options(sampler, steps, batch_size)
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
            sample_cfg=SampleConfig(sampler, steps, batch_size),
            seed=seed,
            png_dir=png,
            device=device,
            force=force,
            ctx=ctx,
        )
        console.print(f"wrote {n} samples to {out}")


def register(app: typer.Typer) -> None:
    app.command("train-uncond")(train_uncond_command)
    app.command("sample")(sample_command)
