"""Tiny run settings and helpers for diffem-deepinv's CLI tests (the same as diffem's own suite).

Imported as ``from dinv_helpers import ...``: ``tests/`` has no ``__init__.py``, so pytest puts it
on ``sys.path``.
"""

from __future__ import annotations

from pathlib import Path

import torch


def sets(*assignments: str) -> list[str]:
    """``--set`` options for ``key=value`` assignments, in the order given."""
    return [item for assignment in assignments for item in ("--set", assignment)]


TINY_UNET = sets(
    "network.block_out_channels=[16, 32]",
    "network.norm_num_groups=8",
    "network.down_block_types=[DownBlock2D, DownBlock2D]",
    "network.up_block_types=[UpBlock2D, UpBlock2D]",
)
"""A two-level UNet of 16 and 32 channels (diffem's tests' TINY_UNET)."""
QUICK = sets("train.warmup=0", "sample.steps=4", "em.gaussian_iters=2")
TRAIN = [*TINY_UNET, *sets("train.epochs=1", "train.batch_size=16"), *QUICK]
"""One epoch of batches of 16, 4 sampler steps, 2 Gaussian EM iterations, on the tiny UNet."""


def run_ok(*argv: object) -> None:
    """Run ``diffem *argv`` in-process and require exit code 0."""
    from diffem_cli.cli.app import run

    code = run([str(a) for a in argv])
    assert code == 0, f"diffem {' '.join(map(str, argv))} exited with {code}"


def read_x(folder: Path) -> torch.Tensor:
    """Column ``x`` of the datasets folder ``folder``."""
    import datasets

    from diffem_cli.io.store import columns

    return columns(datasets.load_from_disk(str(folder)), ["x"])["x"]


def read_columns(folder: Path) -> dict[str, torch.Tensor]:
    """Every column of the datasets folder ``folder``."""
    import datasets

    from diffem_cli.io.store import columns

    ds = datasets.load_from_disk(str(folder))
    return columns(ds, list(ds.column_names))


def file_bytes(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` (relative POSIX path) with its contents."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }
