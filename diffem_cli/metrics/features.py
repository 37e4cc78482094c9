"""Offline image features for Frechet distances: a fixed random convolutional network, and raw pixels.

FID needs Inception weights downloaded at run time; these need nothing. ``fd_rand`` is the
Frechet distance between the two sets' features from a *randomly initialised* CNN whose weights
are created at run time from a fixed seed, so every machine computes the same embedding.
Naeem et al. 2020 ("Reliable Fidelity and Diversity Metrics for Generative Models", ICML) found
that embeddings of randomly initialised networks are a workable alternative to ImageNet-trained
ones for evaluating generative models, notably for data far from ImageNet: random convolutions
followed by ReLU and pooling respond to local structure (edges, blobs, textures) at several
scales, so the statistics of their responses move when samples get blurry, noisy or lose
structure, and Gaussian statistics of them compare distributions as FID does.

Limits: the numbers are on no standard scale and are not comparable with published FIDs, nor
across image sizes, channel counts or seeds; a random embedding is blind to semantics (it cannot
tell a well-drawn wrong digit from a right one); Frechet distances are biased upward at small
sample counts, so compare methods at equal counts (a few thousand samples or more for the
~500-dimensional ``fd_rand`` features).

``fd_pixels`` is the Frechet distance on raw pixels (downsampled by averaging to at most 1,024
values per image), fine for tiny images such as 8x8 digits where pixels are the features.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from diffem_cli.core.errors import DiffemError
from diffem_cli.metrics.frechet import frechet_distance

WIDTHS = (32, 64, 128)
PIXEL_GRID = 4  # the features also hold the image averaged down to 4x4 per channel
MAX_PIXEL_DIMS = 1024


def _check_images(x: torch.Tensor, name: str) -> None:
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise DiffemError(f"{name} must be images (B, C, H, W) with C = 1 or 3, got shape {tuple(x.shape)}")


def _unit(x: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    lo, hi = float(value_range[0]), float(value_range[1])
    if not hi > lo:
        raise DiffemError(f"value range must be (low, high) with high > low, got {value_range}")
    return (x.detach().cpu().float() - lo) * (2.0 / (hi - lo)) - 1.0


class RandomConvFeatures:
    """A deterministic random CNN embedding: 3x3 conv + ReLU layers (widths 32, 64, 128) with 2x2
    average pooling between them (while the maps are at least 4 pixels high), He-normal weights
    from ``seed``; features are the per-channel mean and standard deviation of every layer's
    response (multi-scale texture statistics) plus the image averaged down to 4x4 (colour and
    layout): ``2 * (32 + 64 + 128) + 16 C`` values per image.
    """

    def __init__(self, channels: int, seed: int = 0) -> None:
        if channels not in (1, 3):
            raise DiffemError(f"random features take 1 or 3 channels, got {channels}")
        gen = torch.Generator().manual_seed(seed)
        self.weights = []
        c_in = channels
        for width in WIDTHS:
            w = torch.randn(width, c_in, 3, 3, generator=gen) * math.sqrt(2.0 / (c_in * 9))
            self.weights.append(w)
            c_in = width
        self.channels = channels

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Features ``(B, F)`` of images ``x`` (B, C, H, W) already scaled to [-1, 1]."""
        feats = []
        h = x.float()
        for i, w in enumerate(self.weights):
            if i > 0 and min(h.shape[-2:]) >= 4:
                h = F.avg_pool2d(h, 2)
            h = F.relu(F.conv2d(h, w, padding=1))
            flat = h.flatten(2)
            feats += [flat.mean(2), flat.std(2, correction=0)]
        feats.append(F.adaptive_avg_pool2d(x.float(), PIXEL_GRID).flatten(1))
        return torch.cat(feats, 1)


def random_features(
    x: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0), seed: int = 0, batch_size: int = 512
) -> torch.Tensor:
    """``RandomConvFeatures`` of images ``x`` in ``value_range``, computed batch by batch (float64)."""
    _check_images(x, "images")
    net = RandomConvFeatures(x.shape[1], seed)
    out = [net(_unit(x[s : s + batch_size], value_range)) for s in range(0, len(x), batch_size)]
    return torch.cat(out).double()


def pixel_features(
    x: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0), max_dims: int = MAX_PIXEL_DIMS
) -> torch.Tensor:
    """Pixels scaled to [-1, 1], averaged down (keeping the aspect) until at most ``max_dims`` values."""
    _check_images(x, "images")
    x = _unit(x, value_range)
    c, h, w = x.shape[1:]
    if c * h * w > max_dims:
        scale = math.sqrt(max_dims / (c * h * w))
        x = F.adaptive_avg_pool2d(x, (max(1, int(h * scale)), max(1, int(w * scale))))
    return x.flatten(1).double()


def _same_images(samples: torch.Tensor, reference: torch.Tensor) -> None:
    _check_images(samples, "samples")
    _check_images(reference, "reference")
    if samples.shape[1:] != reference.shape[1:]:
        raise DiffemError(
            f"samples are {tuple(samples.shape[1:])} images, the reference {tuple(reference.shape[1:])}"
        )


def fd_rand(
    samples: torch.Tensor,
    reference: torch.Tensor,
    value_range: tuple[float, float] = (-1.0, 1.0),
    seed: int = 0,
) -> float:
    """Frechet distance between random-CNN features of ``samples`` and ``reference`` (lower is better)."""
    _same_images(samples, reference)
    return frechet_distance(
        random_features(samples, value_range, seed), random_features(reference, value_range, seed)
    )


def fd_pixels(
    samples: torch.Tensor, reference: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)
) -> float:
    """Frechet distance between the raw pixels (see ``pixel_features``) of the two sets."""
    _same_images(samples, reference)
    return frechet_distance(pixel_features(samples, value_range), pixel_features(reference, value_range))
