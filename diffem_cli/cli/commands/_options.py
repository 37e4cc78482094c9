"""Options several commands share, declared once as ``Annotated`` types: the sampling options of
``reconstruct`` and ``sample``, ``--device`` and ``--log``."""

from __future__ import annotations

from typing import Annotated

import typer

from diffem_cli.core.tracking import LOG_HELP

CHECKPOINT_DEFAULT = "Default: the checkpoint's (what its run sampled with)."

Sampler = Annotated[str | None, typer.Option(help=f"dpm++, ddim or ddpm (ancestral). {CHECKPOINT_DEFAULT}")]
Steps = Annotated[int | None, typer.Option(help=f"Sampler steps = network evaluations. {CHECKPOINT_DEFAULT}")]
Corrections = Annotated[
    int | None, typer.Option(help=f"Langevin corrections after each step. {CHECKPOINT_DEFAULT}")
]
Device = Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N (default: cuda when available).")]
Trackers = Annotated[list[str] | None, typer.Option("--log", "--log-with", metavar="TRACKER", help=LOG_HELP)]
