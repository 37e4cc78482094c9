"""``diffem evaluate``: metrics of samples or reconstructions against a clean reference folder."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from diffem_cli.core.logs import notice


def evaluate_command(
    samples: Annotated[
        Path,
        typer.Argument(
            metavar="SAMPLES", help="Samples or reconstructions folder (column x; index to pair)."
        ),
    ],
    reference: Annotated[
        Path, typer.Option("--reference", help="Clean data folder (from corrupt --clean-out).")
    ],
    metrics: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated metric names (default: sinkhorn,sliced_w2 for vectors; "
            "psnr,ssim,fd_rand,fd_pixels for images). All: sinkhorn, sliced_w2, psnr, ssim, "
            "fd_rand, fd_pixels, and opt-in fid, kid, is (local Inception weights), fd_dinov2 "
            "(local DINOv2 weights)."
        ),
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the results to this JSON file.")
    ] = None,
    observations: Annotated[
        Path | None,
        typer.Option(
            help="The observations SAMPLES reconstruct. With K >= 2 draws per observation "
            "(reconstruct --per-observation K), posterior calibration leaves out the entries they "
            "give exactly, and their observed residual is reported."
        ),
    ] = None,
    n_points: Annotated[int, typer.Option(help="Points per set for the Sinkhorn divergence.")] = 4096,
    seed: Annotated[int, typer.Option(help="Seed of the subsets and projections.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing --json file.")] = False,
    inception_weights: Annotated[
        Path | None,
        typer.Option(
            help="torch-fidelity's Inception weights file, for fid, kid and is "
            "(default: $DIFFEM_INCEPTION_WEIGHTS; nothing is downloaded)."
        ),
    ] = None,
    dinov2: Annotated[
        Path | None,
        typer.Option(
            help="A local facebook/dinov2-base model folder, for fd_dinov2 (default: $DIFFEM_DINOV2)."
        ),
    ] = None,
) -> None:
    """Score SAMPLES against a clean REFERENCE: a table of metrics.

    SAMPLES with K >= 2 draws per observation (reconstruct --per-observation K) are also scored as a
    posterior (post_*): one draw against the K-draw mean, and with --observations, calibration.
    """
    from rich.console import Console
    from rich.table import Table

    from diffem_cli import __version__
    from diffem_cli.core.errors import DiffemError
    from diffem_cli.io.store import check_output, write_text_atomic
    from diffem_cli.metrics.evaluate import METRICS, evaluate_folders, posterior_folder
    from diffem_cli.metrics.posterior_quality import BETTER

    for path, what in ((samples, "samples"), (reference, "reference"), (observations, "observations")):
        if path is None:
            continue
        if not path.exists():
            raise DiffemError(f"{what} folder {path} does not exist")
    if json_out is not None:
        if json_out.is_dir():
            raise DiffemError(f"--json {json_out} is a folder; give a file name")
        check_output(json_out, force, [samples, reference], kind="file")
    if n_points < 1:
        raise DiffemError(f"--n-points must be >= 1, got {n_points}")
    weights = {"inception": inception_weights, "dinov2": dinov2}
    names = None if metrics is None else [m for m in metrics.split(",") if m.strip()]
    seen = None
    if observations is not None:
        from diffem_cli.io.observations import Observations

        seen = Observations(observations)
    t0 = time.perf_counter()
    results = evaluate_folders(samples, reference, names, n_points=n_points, seed=seed, weights=weights)
    mine = {} if seen is None else {"channel": seen.channel, "obs": seen.obs, "obs_index": seen.index}
    posterior = posterior_folder(samples, reference, **mine) or {}
    seconds = time.perf_counter() - t0

    table = Table(title=f"{samples} vs {reference}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("better", justify="center")
    for name, value in results.items():
        table.add_row(name, f"{value:.6g}", "lower" if METRICS[name].lower_is_better else "higher")
    for name, value in posterior.items():
        table.add_row(name, f"{value:.6g}", BETTER.get(name.removeprefix("post_"), ""))
    Console().print(table)
    if json_out is not None:
        record = {
            "samples": str(samples),
            "reference": str(reference),
            "metrics": results,
            **({"posterior": posterior} if posterior else {}),
            **({"observations": str(observations)} if observations is not None else {}),
            "n_points": n_points,
            "seed": seed,
            "seconds": round(seconds, 3),
            "diffem_version": __version__,
        }
        write_text_atomic(json_out, json.dumps(record, indent=2) + "\n")
        notice(f"wrote {json_out}")


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate_command)
