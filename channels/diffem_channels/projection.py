"""``projection``: a fresh random linear projection per sample, ``y = A_i x + sigma * eps``.

The manifold benchmark's channel: each vector is seen through its own ``m x n`` Gaussian
matrix with unit-norm rows, which (unlike one fixed projection) makes the clean law identifiable.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from diffem_channels.base import (
    Channel,
    ChannelError,
    ImportField,
    Observation,
    Param,
    non_negative,
    per_sample,
)

if TYPE_CHECKING:
    import torch

MATRIX_STREAM = 0
NOISE_STREAM = 1


def _at_least_one(v: int) -> str | None:
    return None if v >= 1 else "must be >= 1"


_at_least_one.constraint = ">= 1"  # type: ignore[attr-defined]

UNIT_ROW_TOL = 1e-4  # float32 rounding of a normalised row stays far below this


def _unit_rows(a: torch.Tensor) -> str | None:
    """``ImportField.check`` of ``A`` under ``normalize``: every row of unit Euclidean norm."""
    worst = float((a.double().norm(dim=-1) - 1).abs().max()) if a.numel() else 0.0
    if worst <= UNIT_ROW_TOL:
        return None
    return f"rows must have unit norm (normalize=True), off by up to {worst:.3g}"


class ProjectionChannel(Channel):
    """Per-sample random projections of vectors; the observation stores ``y`` and the matrix ``A``."""

    name = "projection"
    description = "A fresh random m x n projection per vector (unit-norm rows) plus Gaussian noise."
    data_kinds = frozenset({"vector"})
    linear = True
    params = (
        Param("m", int, 2, "number of measurements per vector (rows of A)", _at_least_one),
        Param("sigma", float, 0.01, "std of Gaussian noise added to the measurements", non_negative),
        Param("normalize", bool, True, "scale each row of A to unit Euclidean norm"),
        Param("features", bool, True, "also condition on A^+ y and the projector A^+ A (conditioning only)"),
    )

    def check_data(self, shape: tuple[int, ...]) -> None:
        super().check_data(shape)
        if self.m > shape[0]:
            raise ChannelError(
                f"channel 'projection' needs m <= n, got m={self.m} for vectors of size {shape[0]}"
            )

    def corrupt(self, x: torch.Tensor, seeds: torch.Tensor) -> Observation:
        import torch

        self.check_data(tuple(x.shape[1:]))
        # float64 inside: batched float32 reductions may round differently with the batch size
        a = per_sample(seeds, (self.m, x.shape[1]), "randn", MATRIX_STREAM).to(x.device, torch.float64)
        if self.normalize:
            a = a / a.norm(dim=-1, keepdim=True)
        y = torch.einsum("bmn,bn->bm", a, x.double()).to(x.dtype)
        a = a.to(x.dtype)
        if self.sigma > 0:
            y = y + self.sigma * per_sample(seeds, (self.m,), "randn", NOISE_STREAM).to(x)
        return {"y": y, "A": a}

    def import_fields(self, shape: tuple[int, ...]) -> tuple[ImportField, ...]:
        """The per-sample matrix ``A`` (m x n), from a safetensors file or a column."""
        self.check_data(tuple(shape))
        return (
            ImportField(
                "A",
                (self.m, shape[0]),
                help="the sample's m x n projection matrix",
                check=_unit_rows if self.normalize else None,
            ),
        )

    def condition(self, obs: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        import torch

        y = obs["y"]
        a = obs["A"].to(y)
        parts = [y, a.flatten(1)]
        if self.features:
            pinv = torch.linalg.pinv(a.double()).to(y)
            parts += [torch.einsum("bnm,bm->bn", pinv, y), (pinv @ a).flatten(1)]
        return torch.cat(parts, dim=1)

    def cond_size(self, shape: tuple[int, ...]) -> int:
        self.check_data(tuple(shape))
        n = shape[0]
        return self.m + self.m * n + (n + n * n if self.features else 0)

    def A(self, obs: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.einsum("bmn,bn->bm", obs["A"].to(x), x)

    def At(self, obs: Mapping[str, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.einsum("bmn,bm->bn", obs["A"].to(y), y)

    def noise_std(self, obs: Mapping[str, torch.Tensor]) -> float:
        return float(self.sigma)
