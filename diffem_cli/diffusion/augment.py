"""Geometric augmentation of training batches (``train.augment``).

Each row of a batch is flipped (``hflip``: left-right) or sent through a random element of the
square's symmetry group (``dihedral``: left-right flip, up-down flip and transposition, each with
probability 1/2), and every tensor of the row gets the same transform: the clean image, its
conditioning (observation, mask, Gaussian feature) and its per-pixel weights, as DiffEM's official
code gives ``x`` and ``y~`` the same augmentation key. The pairs stay valid draws of the channel only
when the data and the channel are both symmetric under the transforms (natural images through an
i.i.d. pixel mask, an isotropic blur, white noise); digits, text or a directional blur are not, so
the default is ``none``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from diffem_cli.core.errors import DiffemError

AUGMENTS: tuple[str, ...] = ("none", "hflip", "dihedral")


def check_augment(mode: str, data: Mapping[str, torch.Tensor]) -> None:
    """One-line DiffemError when ``data`` (the training columns) cannot take ``mode``: every column
    must be images ``(N, C, H, W)`` of one height and width (square for ``dihedral``), since a
    vector conditioning (a projection's ``y``) cannot be flipped along with its image."""
    if mode == "none":
        return
    if mode not in AUGMENTS:
        raise DiffemError(f"unknown train.augment {mode!r} (choose from {', '.join(AUGMENTS)})")
    sizes = {k: tuple(v.shape[2:]) if v.dim() == 4 else None for k, v in data.items()}
    odd = sorted(k for k, s in sizes.items() if s is None)
    if odd:
        raise DiffemError(
            f"train.augment={mode} needs image columns (N, C, H, W); {', '.join(odd)} "
            "is not one (vector data, or a channel whose conditioning is not an image)"
        )
    if len(set(sizes.values())) > 1:
        raise DiffemError(f"train.augment={mode}: the columns' image sizes differ ({sizes})")
    h, w = next(iter(sizes.values()))
    if mode == "dihedral" and h != w:
        raise DiffemError(f"train.augment=dihedral needs square images, got {h}x{w}")


def _where(flag: torch.Tensor, moved: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    return torch.where(flag.view(-1, 1, 1, 1), moved, kept)


def augment_batch(
    batch: Mapping[str, torch.Tensor], mode: str, gen: torch.Generator
) -> dict[str, torch.Tensor]:
    """``batch`` with each row transformed by ``mode`` (the same transform on every column), the
    transforms drawn from ``gen``; unchanged, and ``gen`` untouched, for ``none``."""
    if mode == "none":
        return dict(batch)
    n = len(next(iter(batch.values())))
    draws = 1 if mode == "hflip" else 3
    flags = torch.rand(draws, n, generator=gen, device=gen.device) < 0.5
    out = {k: _where(flags[0], v.flip(-1), v) for k, v in batch.items()}
    if mode == "dihedral":
        out = {k: _where(flags[1], v.flip(-2), v) for k, v in out.items()}
        out = {k: _where(flags[2], v.transpose(-2, -1), v) for k, v in out.items()}
    return out
