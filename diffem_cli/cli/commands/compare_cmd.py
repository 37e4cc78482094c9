"""``diffem compare``: run several methods on the same observations and budget, side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diffem_cli.cli.commands._help import config_help, method_help
from diffem_cli.cli.commands._options import Device, Trackers
from diffem_cli.core.logs import notice


def compare_command(
    data: Annotated[
        Path, typer.Argument(metavar="DATA", help="Observations folder written by 'diffem corrupt'.")
    ],
    out: Annotated[
        Path, typer.Argument(metavar="OUT", help="Folder for one RUN per method and the comparison files.")
    ],
    methods: Annotated[
        str | None,
        typer.Option(
            help=method_help(
                "comma-separated, or 'all': every method that can serve the channel; default: those "
                "'diffem methods --json' marks compared_by_default"
            )
        ),
    ] = None,
    eval_clean: Annotated[
        Path | None,
        typer.Option(
            help="Clean data folder (corrupt --clean-out): evaluation, and the data of methods that "
            "train on clean data. Without it, methods are scored by label-free measures only "
            "(obs_sw2, observed_residual, uncond_obs_sw2: lower is better)."
        ),
    ] = None,
    config: Annotated[
        str | None,
        typer.Option(
            "--config",
            "-c",
            metavar="PRESET|FILE|RUN",
            help=config_help("Default: the preset for the data's shape."),
        ),
    ] = None,
    laps: Annotated[
        int | None, typer.Option("--laps", "-k", help="Laps per method (default: the config's).")
    ] = None,
    sets: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", metavar="KEY=VALUE", help="Override one key: train.lr=2e-4."),
    ] = None,
    uncond: Annotated[
        bool,
        typer.Option(
            help="Also sample each method's unconditional model and score it: a prior method's prior, "
            "a conditional method's trained from scratch on its last reconstructions for laps x "
            "train.epochs epochs (the budget of a prior over its laps)."
        ),
    ] = True,
    seeds: Annotated[
        int,
        typer.Option(
            help="Runs per method, with the config's seed, seed + 1, ... (runs after the first in "
            "OUT/METHOD-seedS); compare.md and compare.json give each metric's mean and 95% "
            "Student-t interval."
        ),
    ] = 1,
    match: Annotated[
        str,
        typer.Option(
            "--match",
            metavar="steps|compute",
            help="Equal posterior sampler steps for every method, or equal network passes: each "
            "method's steps divided by the passes one of its steps costs (DPS 2, MMPS 2 + CG "
            "iterations).",
        ),
    ] = "steps",
    device: Device = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Start every method's RUN over (in a compare OUT diffem wrote; never another folder).",
        ),
    ] = False,
    log_with: Trackers = None,
) -> None:
    """Compare methods on the same observations and budget.

    Every method is a resumable RUN in OUT/METHOD (a killed compare resumes where it stopped);
    OUT/compare.json, compare.md, compare.png and compare-samples.png hold the comparison.
    """
    from diffem_cli.cli.commands._checks import at_least, check_run_folder, need_existing
    from diffem_cli.config.run import default_preset, load_config
    from diffem_cli.core.progress import console
    from diffem_cli.io.store import read_manifest
    from diffem_cli.methods import extensions
    from diffem_cli.pipeline.compare import compare, markdown_table, parse_methods

    need_existing(data, "observations folder", folder=True)
    if eval_clean is not None:
        need_existing(eval_clean, "--eval-clean folder", folder=True)
    at_least("--laps", laps)
    at_least("--seeds", seeds)
    check_run_folder(out, [p for p in (data, eval_clean) if p is not None])
    names = parse_methods(methods)
    manifest = read_manifest(data)
    default = default_preset(manifest.get("data_shape", [0, 0, 0]))
    cfg = load_config(config, sets or [], default_preset=default, extensions=extensions())
    from diffem_cli.core.tracking import check_trackers

    track = check_trackers(log_with)
    summary = compare(
        data,
        out,
        names,
        cfg,
        eval_clean=eval_clean,
        laps=laps,
        uncond=uncond,
        seeds=seeds,
        match=match,
        device=device,
        force=force,
        skip_unfit=(methods or "").strip() == "all",
        track=track,
        log=notice,
    )
    console.print(markdown_table(summary), soft_wrap=True)
    notice(f"[green]done[/green]: {out / 'compare.json'}, {out / 'compare.png'}", markup=True)


def register(app: typer.Typer) -> None:
    app.command("compare")(compare_command)
