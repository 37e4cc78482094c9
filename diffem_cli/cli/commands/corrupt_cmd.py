"""``diffem corrupt``: observe a clean source through a channel and save the observations."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from diffem_cli.core.errors import DiffemError


def corrupt(
    source: str = typer.Argument(
        ...,
        metavar="SOURCE",
        help="Clean data: manifold[:samples=16384,n=5,seed=0,draw_seed=1] (seed fixes the curve, "
        "draw_seed, default seed + 1, the points on it), digits, a folder, or hf:NAME[:SPLIT].",
    ),
    out: Path = typer.Argument(..., metavar="OUT", help="Observations folder to write (a datasets folder)."),
    channel: str = typer.Option(..., "--channel", "-c", help="Channel name (see `diffem channels`)."),
    param: list[str] = typer.Option([], "--param", "-p", help="Channel parameter KEY=VALUE (repeatable)."),
    seed: int = typer.Option(0, "--seed", help="Corruption seed; the same seed gives identical output."),
    limit: int | None = typer.Option(None, "--limit", help="Use only the first N samples (after --skip)."),
    skip: int = typer.Option(
        0,
        "--skip",
        help="Leave out the first N samples: with --limit, a train/test split of one source. Each "
        "sample keeps its index, and so its corruption seed.",
    ),
    clean_out: Path | None = typer.Option(None, "--clean-out", help="Also write the clean samples here."),
    preview: Path | None = typer.Option(None, "--preview", help="Write a PNG of the first examples."),
    force: bool = typer.Option(
        False,
        "--force",
        help="Replace outputs diffem wrote (never another folder) and an existing --preview file.",
    ),
    chunk_size: int = typer.Option(1024, "--chunk-size", help="Samples per chunk (memory, not output)."),
) -> None:
    """Corrupt clean data through a channel into observations.

    Every sample of SOURCE is corrupted with its own seed; OUT (+ manifest) is the same, byte for
    byte, for the same --seed.
    """
    from diffem_cli.io import registry
    from diffem_cli.io.sources import load_source
    from diffem_cli.io.store import read_dataset
    from diffem_cli.pipeline.corrupt import corrupt_dataset

    if chunk_size < 1:
        raise DiffemError(f"--chunk-size must be >= 1, got {chunk_size}")
    if limit is not None and limit < 1:
        raise DiffemError(f"--limit must be >= 1, got {limit}")
    if skip < 0:
        raise DiffemError(f"--skip must be >= 0, got {skip}")
    from diffem_cli.io.store import check_apart

    check_apart(out, [source])  # before loading: the source may be large, the mistake is plain
    for extra in (clean_out, preview):
        if extra is not None:
            check_apart(extra, [source])
    started = time.perf_counter()
    chan = registry.make_channel(channel, registry.parse_assignments(param))
    src = load_source(source, limit=limit, skip=skip)
    manifest = corrupt_dataset(
        src, chan, out, seed=seed, clean_out=clean_out, preview=preview, force=force, chunk_size=chunk_size
    )
    ds, _ = read_dataset(out)
    seconds = time.perf_counter() - started
    extra = "".join(f", {what} {p}" for what, p in (("clean", clean_out), ("preview", preview)) if p)
    typer.echo(
        f"wrote {manifest['num_rows']} rows ({', '.join(ds.column_names)}) to {out} in {seconds:.1f} s{extra}"
    )


def register(app: typer.Typer) -> None:
    """Add ``corrupt`` to the ``diffem`` app."""
    app.command("corrupt")(corrupt)
