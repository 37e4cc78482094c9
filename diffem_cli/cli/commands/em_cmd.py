"""``diffem em-train``: run or resume the DiffEM loop on an observations folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diffem_cli.core.progress import console


def method_help(what: str) -> str:
    """``--method`` help naming the installed methods (``diffem methods`` lists them in full)."""
    from diffem_cli.methods.registry import declared_names

    return f"Method: {', '.join(declared_names())} ({what}; 'diffem methods' describes them)."


def em_train_command(
    data: Annotated[
        Path, typer.Argument(metavar="DATA", help="Observations folder written by 'diffem corrupt'.")
    ],
    run: Annotated[
        Path, typer.Argument(metavar="RUN", help="RUN folder: created, or resumed when it exists.")
    ],
    laps: Annotated[
        int | None, typer.Option("--laps", "-k", help="Number of EM laps (default: the config's).")
    ] = None,
    config: Annotated[
        str | None,
        typer.Option("--config", "-c", help="Preset (manifold, digits, cifar10, celeba) or a YAML file."),
    ] = None,
    sets: Annotated[
        list[str] | None, typer.Option("--set", "-s", help="Override one key: train.lr=2e-4.")
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
        typer.Option(help="Clean data folder (from corrupt --clean-out) to evaluate every lap against."),
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="cpu, cuda or cuda:N (default: cuda when available).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Start RUN over even if it holds another run.")] = False,
) -> None:
    """Learn a diffusion model from observations alone (DiffEM, or a peer with --method).

    Lap 0 fits a Gaussian prior (exact posterior for linear channels); each DiffEM lap re-corrupts
    the reconstructions, fine-tunes the conditional model (M-step) and resamples every observation
    (E-step). EM-MMPS and DPS-EM train an unconditional prior and sample posteriors by guidance.
    Re-running on an existing RUN resumes from where it stopped.
    """
    from diffem_cli.cli.commands._checks import at_least, check_observations, check_run_folder, need_existing
    from diffem_cli.config.run import default_preset, load_config
    from diffem_cli.core.runtime import launch
    from diffem_cli.io.store import read_dataset
    from diffem_cli.methods import extensions
    from diffem_cli.pipeline.em import em_train

    ds, manifest = read_dataset(data)
    check_observations(ds, manifest, data)
    at_least("--laps", laps)
    need_existing(warm_start, "--warm-start checkpoint")
    need_existing(eval_clean, "--eval-clean folder", folder=True)
    need_existing(clean, "--clean folder", folder=True)
    check_run_folder(run, [data, warm_start, eval_clean, clean])
    default = default_preset(manifest.get("data_shape", [0, 0, 0]))
    cfg = load_config(config, sets or [], default_preset=default, extensions=extensions())
    with launch(device) as ctx:  # one process, or one of several under torchrun / accelerate launch
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
            log=lambda s: console.print(s, soft_wrap=True),
            ctx=ctx,
        )
        console.print(
            f"[green]done[/green]: {len(records) - 1} laps in {run}; "
            f"last checkpoint {run / 'checkpoints' / f'lap_{len(records) - 1:03d}.safetensors'}"
        )


def register(app: typer.Typer) -> None:
    app.command("em-train")(em_train_command)
