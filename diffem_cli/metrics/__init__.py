"""Metrics comparing samples with clean data: point clouds, paired images, image distributions.

- ``sinkhorn_divergence`` / ``sinkhorn_cost``: the manifold benchmark's score (POT semantics).
- ``sliced_wasserstein``: sliced W2 between point clouds.
- ``psnr`` / ``ssim``: reconstructions against the clean images they recover (paired).
- ``frechet_distance``, ``fd_rand``, ``fd_pixels``: Frechet distances in offline feature spaces.
- ``diffem_cli.metrics.online``: opt-in FID, IS and FD-DINOv2 (extra packages, downloaded weights).

``diffem_cli.metrics.evaluate`` picks and runs them by name.
"""

from diffem_cli.metrics.features import fd_pixels, fd_rand, pixel_features, random_features
from diffem_cli.metrics.frechet import frechet_distance, frechet_from_moments
from diffem_cli.metrics.images import psnr, ssim
from diffem_cli.metrics.sinkhorn import sinkhorn_cost, sinkhorn_divergence
from diffem_cli.metrics.sliced import sliced_wasserstein

__all__ = [
    "fd_pixels",
    "fd_rand",
    "frechet_distance",
    "frechet_from_moments",
    "pixel_features",
    "psnr",
    "random_features",
    "sinkhorn_cost",
    "sinkhorn_divergence",
    "sliced_wasserstein",
    "ssim",
]
