"""The final projection of posterior samples onto the observations' affine set ``{x : A x = y}``.

On a noiseless linear channel the true posterior lives on that set; a learnt sampler only comes
near it. The nearest point (in Euclidean distance) of the set is ``x - A^T (A A^T)^+ (A x - y)``,
here by conjugate gradients on ``A A^T`` in float64, one system per sample; a direction ``A``
barely passes contributes little to ``A x - y`` and is corrected as little, so an ill-conditioned
blur needs no regularisation. Masks need none of this: their exact entries are written back
(``sample.keep_observed``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from diffem_cli.gaussian.linalg import conjugate_gradient

PROJECTION_ITERS = 200  # CG steps at most; each system stops once its residual fell by 1e-10
PROJECTION_TOL = 1e-10


def project_onto_observations(channel: Any, obs: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The point of ``{x : A x = y}`` nearest to each row of ``x`` (same dtype as ``x``), for a
    linear ``channel`` and its observations ``obs`` (rows aligned with ``x``)."""
    obs64 = {k: v.double() if v.is_floating_point() else v for k, v in obs.items()}
    x64 = x.double()
    residual = channel.A(obs64, x64) - obs64["y"]
    z = conjugate_gradient(
        lambda u: channel.A(obs64, channel.At(obs64, u)), residual, PROJECTION_ITERS, tol=PROJECTION_TOL
    )
    return (x64 - channel.At(obs64, z)).to(x.dtype)
