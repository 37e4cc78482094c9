"""Checks the command layer makes before calling the library: one-line errors, nothing written."""

from __future__ import annotations

from pathlib import Path

from diffem_cli.core.errors import DiffemError


def need_existing(path: Path | None, what: str, *, folder: bool | None = None) -> None:
    """Refuse a missing input (``folder=True``: it must be a folder; ``False``: a file)."""
    if path is None:
        return
    path = Path(path)
    if not path.exists():
        raise DiffemError(f"{what} {path} does not exist")
    if folder is True and not path.is_dir():
        raise DiffemError(f"{what} {path} is a file, not a folder")
    if folder is False and path.is_dir():
        raise DiffemError(f"{what} {path} is a folder, not a file")


def check_run_folder(run: Path, inputs: list[Path | None], what: str = "RUN") -> None:
    """A RUN must be a folder (or not exist yet, with an existing parent) clear of every input."""
    from diffem_cli.io.store import check_apart

    run = Path(run)
    if run.exists() and not run.is_dir():
        raise DiffemError(f"{what} {run} is a file, not a folder; give a new or existing RUN folder")
    if not run.exists() and not run.parent.exists():
        raise DiffemError(f"folder {run.parent} does not exist")
    check_apart(run, inputs)


def at_least(option: str, value: int | None, lo: int = 1) -> None:
    """Refuse an integer option below ``lo``."""
    if value is not None and value < lo:
        raise DiffemError(f"{option} must be >= {lo}, got {value}")


def check_observations(ds: object, manifest: dict, path: Path) -> None:
    """An observations folder written by ``diffem corrupt`` whose manifest agrees with its columns."""
    from diffem_cli.io.store import check_manifest_columns

    if manifest.get("kind") != "observations" or "channel" not in manifest:
        raise DiffemError(f"{path} is not an observations folder written by 'diffem corrupt'")
    check_manifest_columns(ds, manifest, path)


def given_sampling(
    sampler: str | None, steps: int | None, batch_size: int, corrections: int | None
) -> dict[str, object]:
    """The sampling options a user set (None: not given), to lay over a checkpoint's own settings;
    checked before any work by the library's rules (``validate_sample``), naming the options."""
    from diffem_cli.diffusion.sampling import SampleConfig, validate_sample

    given = {"sampler": sampler, "steps": steps, "batch_size": batch_size, "corrections": corrections}
    given = {k: v for k, v in given.items() if v is not None}
    validate_sample(SampleConfig(**given), prefix="--")
    return given
