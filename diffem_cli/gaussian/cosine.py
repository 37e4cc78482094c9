"""The orthonormal 2-D cosine basis (DCT-II) of an image grid.

A stationary covariance on a grid (the same correlation for every pair of pixels at the same
offset) is nearly diagonal in this basis, and exactly so with reflected boundaries; natural images
are close to stationary. A Gaussian prior whose residual is diagonal here rather than per pixel
(``GaussianPrior(basis=cosine_basis(h, w))``) keeps each spatial frequency's variance, which a
per-pixel diagonal cannot: it has no correlation between neighbours at all.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def cosine_1d(n: int) -> Tensor:
    """``(n, n)`` float64 orthonormal DCT-II matrix, one basis vector per column:
    ``C[i, k] = s_k cos(pi (2 i + 1) k / (2 n))`` with ``s_0 = sqrt(1/n)``, ``s_k = sqrt(2/n)``."""
    i = torch.arange(n, dtype=torch.float64)[:, None]
    k = torch.arange(n, dtype=torch.float64)[None, :]
    c = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    c[:, 0] = math.sqrt(1.0 / n)
    return c


def cosine_basis(height: int, width: int) -> Tensor:
    """``(H W, H W)`` float32 orthonormal 2-D DCT-II basis of an ``H x W`` grid (row-major pixels),
    one basis vector per column, in the convention of
    :func:`~diffem_cli.gaussian.linalg.to_coords`; columns in order of the (row, column) frequency
    pair."""
    return torch.kron(cosine_1d(height), cosine_1d(width)).float()


def pixel_variances(diag: Tensor, basis: Tensor) -> Tensor:
    """The per-pixel variances ``diag(B diag(d) B^T)`` ``(D,)`` of a residual ``d`` ``(D,)`` that
    is diagonal in the block basis ``I (x) basis`` (one block of ``k`` coordinates per channel)."""
    k = basis.shape[0]
    return (diag.view(-1, k) @ basis.to(diag).square().T).reshape(diag.shape)
