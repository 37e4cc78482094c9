"""``diffem export``: a checkpoint as a folder diffusers (or diffem) loads."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diffem_cli.core.logs import notice


def export_command(
    ckpt: Annotated[Path, typer.Argument(metavar="CKPT", help="A diffem checkpoint (.safetensors).")],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Output folder.")],
    force: Annotated[bool, typer.Option("--force", help="Overwrite OUT if it exists.")] = False,
) -> None:
    """Export a checkpoint as a folder diffusers loads.

    Unconditional image model -> DDPMPipeline folder; conditional -> diffusers UNet + conditioning
    description (reconstruct accepts it); vector models -> safetensors + config.
    """
    from diffem_cli.cli.commands._checks import need_existing
    from diffem_cli.io.store import check_output
    from diffem_cli.pipeline.export import export_checkpoint

    need_existing(ckpt, "checkpoint", folder=False)
    check_output(out, force, [ckpt])

    meta = export_checkpoint(ckpt, out, force=force)
    notice(f"exported {meta['kind']} {meta['network']['type']} model to {out}")


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)
