"""``diffem import``: bring data that are already corrupted in as an observations folder."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from diffem_cli.core.errors import DiffemError


def import_command(
    source: Annotated[
        str,
        typer.Argument(
            metavar="SOURCE",
            help="The observed data: a folder of images (PNG, JPEG; sorted by name), a saved data set "
            "(datasets.save_to_disk), a .safetensors file holding y, or hf:NAME[:SPLIT] (a Hub data "
            "set, online).",
        ),
    ],
    out: Annotated[
        Path, typer.Argument(metavar="OUT", help="Observations folder to write (a datasets folder).")
    ],
    channel: Annotated[
        str,
        typer.Option("--channel", "-c", help="The channel that corrupted the data (see `diffem channels`)."),
    ],
    param: Annotated[
        list[str] | None,
        typer.Option(
            "--param",
            "-p",
            metavar="KEY=VALUE",
            help="Channel parameter KEY=VALUE, e.g. -p sigma=1.5 (repeatable).",
        ),
    ] = None,
    column: Annotated[
        str | None,
        typer.Option(
            metavar="COL",
            help="The data set column (or safetensors tensor) of the observations. "
            "Default: y, else the image column.",
        ),
    ] = None,
    mask: Annotated[
        Path | None,
        typer.Option(
            metavar="DIR",
            help="Folder of mask images named like the observations (white = observed, black = missing).",
        ),
    ] = None,
    field: Annotated[
        list[str] | None,
        typer.Option(
            "--field",
            metavar="NAME=SPEC",
            help="NAME=SPEC for what the channel reads beyond y: column:COL, a folder of images or a "
            ".safetensors file (e.g. --field A=matrices.safetensors). Default: SOURCE's column of that name.",
        ),
    ] = None,
    params: Annotated[
        Path | None,
        typer.Option(
            metavar="FILE",
            help="Per-sample parameters: a CSV (header file,NAME,...) or JSON file keyed by file name.",
        ),
    ] = None,
    data_shape: Annotated[
        str | None,
        typer.Option(
            metavar="SHAPE",
            help="Shape of the clean data, e.g. 5 or 3,32,32. Default: inferred from y and the fields.",
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace OUT if diffem wrote it; never another folder.")
    ] = False,
    chunk_size: Annotated[int, typer.Option(help="Observations per chunk (memory, not output).")] = 1024,
) -> None:
    """Import observations that are already corrupted, with what the channel needs.

    OUT is the same kind of folder `diffem corrupt` writes (manifest, checksum, index column, and
    the source's file names), so em-train, reconstruct and compare take it; no clean data needed.
    Everything is checked against the channel first: a refusal writes nothing.
    """
    from diffem_cli.io import registry
    from diffem_cli.io.store import check_apart, read_dataset
    from diffem_cli.pipeline.importer import import_observations

    if chunk_size < 1:
        raise DiffemError(f"--chunk-size must be >= 1, got {chunk_size}")
    check_apart(out, [source])
    inputs: dict[str, str] = {}
    for item in field or []:
        name, sep, spec = item.partition("=")
        if not sep or not name.strip() or not spec.strip():
            raise DiffemError(f"--field expects NAME=SPEC, got {item!r}")
        inputs[name.strip()] = spec.strip()
    if mask is not None:
        if "mask" in inputs:
            raise DiffemError("give the mask once: --mask DIR or --field mask=...")
        inputs["mask"] = str(mask)
    shape = None
    if data_shape is not None:
        try:
            shape = [int(s) for s in data_shape.replace("x", ",").split(",")]
        except ValueError:
            raise DiffemError(
                f"--data-shape expects integers such as 5 or 3,32,32, got {data_shape!r}"
            ) from None
    started = time.perf_counter()
    chan = registry.make_channel(channel, registry.parse_assignments(param or []))
    manifest = import_observations(
        source,
        chan,
        out,
        column=column,
        inputs=inputs,
        params_file=params,
        data_shape=shape,
        force=force,
        chunk_size=chunk_size,
    )
    ds, _ = read_dataset(out)
    seconds = time.perf_counter() - started
    typer.echo(
        f"imported {manifest['num_rows']} observations ({', '.join(ds.column_names)}) to {out} "
        f"in {seconds:.1f} s"
    )


def register(app: typer.Typer) -> None:
    """Add ``import`` to the ``diffem`` app."""
    app.command("import")(import_command)
