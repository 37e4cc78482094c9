"""``diffem export``: a checkpoint as a folder diffusers (or diffem) loads."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diffem_cli.core.errors import DiffemError
from diffem_cli.core.logs import notice


def export_command(
    ckpt: Annotated[Path, typer.Argument(metavar="CKPT", help="A diffem checkpoint (.safetensors).")],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Output folder.")],
    force: Annotated[
        bool,
        typer.Option("--force", help="Replace OUT if it is an export diffem wrote; never another folder."),
    ] = False,
    license_id: Annotated[
        str,
        typer.Option(
            "--license",
            help="The model card's license (a Hub license id, e.g. mit, apache-2.0, cc-by-4.0); the default "
            "'other' is a placeholder the card asks you to replace.",
        ),
    ] = "other",
    push_to_hub: Annotated[
        str | None,
        typer.Option(
            "--push-to-hub",
            metavar="REPO",
            help="After writing OUT, upload it to the Hugging Face Hub model repository REPO (user/name; "
            "needs a connection and 'hf auth login'). Off by default.",
        ),
    ] = None,
) -> None:
    """Export a checkpoint as a folder diffusers loads.

    Unconditional image model -> DDPMPipeline folder; conditional -> diffusers UNet + conditioning
    description (reconstruct accepts it); vector models -> safetensors + config. The model card
    (README.md) lists the provenance: source, channel, method, laps, RUN.
    """
    from diffem_cli.cli.commands._checks import need_existing
    from diffem_cli.io.store import check_output
    from diffem_cli.pipeline.export import export_checkpoint

    need_existing(ckpt, "checkpoint", folder=False)
    check_output(out, force, [ckpt])
    if push_to_hub is not None:
        from huggingface_hub.errors import HFValidationError
        from huggingface_hub.utils import validate_repo_id

        try:
            validate_repo_id(push_to_hub)
        except HFValidationError:
            wrong = f"--push-to-hub {push_to_hub!r} is not a Hub repository id (user/name)"
            raise DiffemError(wrong) from None

    meta = export_checkpoint(ckpt, out, force=force, license_id=license_id, repo=push_to_hub)
    notice(f"exported {meta['kind']} {meta['network']['type']} model to {out}")
    if push_to_hub is not None:
        from diffem_cli.pipeline.export import push_to_hub as push

        notice(f"pushed {out} to {push(out, push_to_hub)}")


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)
