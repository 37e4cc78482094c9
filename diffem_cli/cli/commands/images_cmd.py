"""``diffem to-images``: a diffem image folder as a ``datasets`` folder with an ``image`` column."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diffem_cli.core.logs import notice


def to_images_command(
    folder: Annotated[
        Path,
        typer.Argument(
            metavar="FOLDER",
            help="A data folder diffem wrote holding images: observations, --clean-out data, "
            "reconstructions or samples.",
        ),
    ],
    out: Annotated[
        Path,
        typer.Argument(
            metavar="OUT",
            help="Datasets folder to write: column image (datasets.Image, PNG) and FOLDER's index, "
            "sample, file_name and label.",
        ),
    ],
    missing: Annotated[
        str,
        typer.Option(
            metavar="transparent|red|grey",
            help="Observations: how pixels missing in every channel are drawn: transparent (an alpha "
            "channel, 0 where missing), red, or grey (the stored 0, mid-grey).",
        ),
    ] = "transparent",
    force: Annotated[
        bool, typer.Option("--force", help="Replace OUT if diffem wrote it; never another folder.")
    ] = False,
    chunk_size: Annotated[int, typer.Option(help="Images per chunk (memory, not output).")] = 256,
) -> None:
    """Write FOLDER's images as PNGs in a datasets.Image column (for the Hub's dataset viewer).

    Vector data and observations that are not images (a projection's) are refused.
    """
    from diffem_cli.cli.commands._checks import at_least, need_existing
    from diffem_cli.pipeline.to_images import to_images

    at_least("--chunk-size", chunk_size)
    need_existing(folder, "FOLDER", folder=True)
    manifest = to_images(folder, out, missing=missing, force=force, chunk_size=chunk_size)
    notice(f"wrote {manifest['num_rows']} images of {manifest['images_of']} {folder} to {out}")


def register(app: typer.Typer) -> None:
    """Add ``to-images`` to the ``diffem`` app."""
    app.command("to-images")(to_images_command)
