"""``diffem report``: the per-lap table and pictures of an em-train RUN."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diffem_cli.core.logs import notice


def report_command(
    run: Annotated[Path, typer.Argument(metavar="RUN", help="An em-train RUN folder.")],
    clean: Annotated[
        Path | None,
        typer.Option(
            help="Clean data folder to draw above the observations (default: the --eval-clean "
            "folder the RUN remembers, while it exists)."
        ),
    ] = None,
) -> None:
    """Print the per-lap table of a RUN and draw its figures.

    Writes RUN/report.json, RUN/report.png and RUN/metrics.png.
    """
    from rich.console import Console

    from diffem_cli.pipeline.report import report_table, write_report

    summary = write_report(run, clean)
    Console().print(report_table(summary["laps"]))
    notice(
        f"training time {summary['train_seconds']:.1f} s; pictures in {run}/report.png"
        + (f", {run}/metrics.png" if (run / "metrics.png").exists() else "")
    )


def register(app: typer.Typer) -> None:
    app.command("report")(report_command)
