"""``diffem em-train``: run or resume the DiffEM loop on an observations folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diffem_cli.cli.commands._help import config_help, method_help
from diffem_cli.cli.commands._options import Device, Trackers


def em_train_command(
    data: Annotated[
        Path, typer.Argument(metavar="DATA", help="Observations folder written by 'diffem corrupt'.")
    ],
    run: Annotated[
        Path, typer.Argument(metavar="RUN", help="RUN folder: created, or resumed when it exists.")
    ],
    laps: Annotated[
        int | None,
        typer.Option(
            "--laps",
            "-k",
            help="Number of EM laps (default: the config's); 0 computes the start (lap 0) alone.",
        ),
    ] = None,
    config: Annotated[
        str | None,
        typer.Option(
            "--config",
            "-c",
            metavar="PRESET|FILE|RUN",
            help=config_help(
                "Default: an existing RUN's own (so --laps alone extends it; not with --force), else the "
                "preset for the data's shape."
            ),
        ),
    ] = None,
    sets: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", metavar="KEY=VALUE", help="Override one key: train.lr=2e-4."),
    ] = None,
    method: Annotated[
        str | None,
        typer.Option("--method", "-m", help=method_help("em.method; default: the config's")),
    ] = None,
    warm_start: Annotated[
        Path | None,
        typer.Option(
            help="Start from this checkpoint instead of the Gaussian start: a conditional one of the same "
            "channel, or an unconditional prior (lap 0 is then guided posterior sampling with it)."
        ),
    ] = None,
    clean: Annotated[
        Path | None,
        typer.Option(help="Clean data folder for methods that train on clean data (reference only)."),
    ] = None,
    eval_clean: Annotated[
        Path | None,
        typer.Option(
            help="Clean data folder (from corrupt --clean-out) to evaluate every lap against; the RUN "
            "remembers it (and --clean, --warm-start) for the next em-train on it."
        ),
    ] = None,
    device: Device = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Start RUN over even if it holds another run (removes only what diffem wrote in it).",
        ),
    ] = False,
    log_with: Trackers = None,
) -> None:
    """Learn a diffusion model from observations alone.

    DiffEM by default, or a peer with --method. Lap 0 fits a Gaussian prior (exact posterior for
    linear channels); each DiffEM lap re-corrupts the reconstructions, fine-tunes the conditional
    model (M-step) and resamples every observation (E-step). EM-MMPS and DPS-EM train an
    unconditional prior and sample posteriors by guidance. Re-running on an existing RUN resumes
    from where it stopped; a larger --laps extends it with the configuration and options it was
    started with.
    """
    from diffem_cli.cli.commands._checks import at_least, check_observations, check_run_folder, need_existing
    from diffem_cli.cli.commands._run_config import config_source, suggest_own_config
    from diffem_cli.config.run import default_preset, load_config
    from diffem_cli.core.logs import notice
    from diffem_cli.core.runtime import launch
    from diffem_cli.core.tracking import check_trackers
    from diffem_cli.io.store import read_dataset
    from diffem_cli.methods import extensions
    from diffem_cli.pipeline.em import em_train

    ds, manifest = read_dataset(data)
    check_observations(ds, manifest, data)
    at_least("--laps", laps, 0)
    need_existing(warm_start, "--warm-start checkpoint")
    need_existing(eval_clean, "--eval-clean folder", folder=True)
    need_existing(clean, "--clean folder", folder=True)
    check_run_folder(run, [data, warm_start, eval_clean, clean])
    default = default_preset(manifest.get("data_shape", [0, 0, 0]))
    source = config_source(run, config, force)
    cfg = load_config(source, sets or [], default_preset=default, extensions=extensions())
    track = check_trackers(log_with)
    # one process, or one of several under torchrun / accelerate launch
    with launch(device) as ctx, suggest_own_config(run, source):
        records = em_train(
            data,
            run,
            cfg,
            laps=laps,
            method=method,
            warm_start=warm_start,
            eval_clean=eval_clean,
            clean=clean,
            device=device,
            force=force,
            log=notice,
            ctx=ctx,
            track=track,
        )
        last = len(records) - 1
        where = (
            run / "checkpoints" / f"lap_{last:03d}.safetensors" if last else run / "samples" / "lap_000.png"
        )
        notice(
            f"[green]done[/green]: {last} laps in {run}; last {'checkpoint' if last else 'picture'} {where}",
            markup=True,
        )


def register(app: typer.Typer) -> None:
    app.command("em-train")(em_train_command)
