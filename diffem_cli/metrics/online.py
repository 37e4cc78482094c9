"""Opt-in metrics that need extra packages and downloaded weights: FID, IS and FD-DINOv2.

They are the field's standard numbers but depend on networks fetched at run time
(Inception via torchmetrics/torch-fidelity, DINOv2 via transformers), which cannot happen on a
machine without internet. They are never defaults; asking for one without its package or weights
raises a one-line ``DiffemError`` saying what to install.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from diffem_cli.core.errors import DiffemError
from diffem_cli.metrics.frechet import frechet_distance

DINOV2_MODEL = "facebook/dinov2-base"

_NEEDS = {
    "fid": "torchmetrics[image] and internet access to download Inception weights once; "
    "install with pip install 'diffem[fid]'",
    "is": "torchmetrics[image] and internet access to download Inception weights once; "
    "install with pip install 'diffem[fid]'",
    "fd_dinov2": f"transformers and internet access to download {DINOV2_MODEL} once; "
    "install with pip install 'diffem[dinov2]'",
}


def _unavailable(metric: str, cause: BaseException) -> DiffemError:
    detail = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return DiffemError(f"metric {metric!r} needs {_NEEDS[metric]} ({type(cause).__name__}: {detail})")


def _load(metric: str, make: Callable[[], Any]) -> Any:
    try:
        return make()
    except DiffemError:
        raise
    except (ImportError, OSError, RuntimeError, ValueError) as e:
        raise _unavailable(metric, e) from None


def _unit_rgb(x: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    """Images in [0, 1] with 3 channels (grey repeated), as the Inception and DINOv2 wrappers expect."""
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise DiffemError(f"image metrics need (B, C, H, W) images with C = 1 or 3, got {tuple(x.shape)}")
    lo, hi = float(value_range[0]), float(value_range[1])
    x = ((x.detach().cpu().float() - lo) / (hi - lo)).clamp(0, 1)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def fid(
    samples: torch.Tensor,
    reference: torch.Tensor,
    value_range: tuple[float, float] = (-1.0, 1.0),
    batch_size: int = 256,
) -> float:
    """FID (torchmetrics ``FrechetInceptionDistance``, 2048-d pool features) of samples vs reference."""

    def make() -> Any:
        from torchmetrics.image.fid import FrechetInceptionDistance

        return FrechetInceptionDistance(feature=2048, normalize=True)

    metric = _load("fid", make)
    for s in range(0, len(reference), batch_size):
        metric.update(_unit_rgb(reference[s : s + batch_size], value_range), real=True)
    for s in range(0, len(samples), batch_size):
        metric.update(_unit_rgb(samples[s : s + batch_size], value_range), real=False)
    return float(metric.compute())


def inception_score(
    samples: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0), batch_size: int = 256
) -> float:
    """Inception Score (torchmetrics ``InceptionScore``, mean over its splits) of the samples."""

    def make() -> Any:
        from torchmetrics.image.inception import InceptionScore

        return InceptionScore(normalize=True)

    metric = _load("is", make)
    for s in range(0, len(samples), batch_size):
        metric.update(_unit_rgb(samples[s : s + batch_size], value_range))
    mean, _ = metric.compute()
    return float(mean)


def dinov2_features(
    x: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0), batch_size: int = 64
) -> torch.Tensor:
    """DINOv2 (``facebook/dinov2-base``) class-token features of images, via transformers."""

    def make() -> Any:
        from transformers import AutoImageProcessor, AutoModel

        return AutoImageProcessor.from_pretrained(DINOV2_MODEL), AutoModel.from_pretrained(
            DINOV2_MODEL
        ).eval()

    processor, model = _load("fd_dinov2", make)
    feats = []
    with torch.inference_mode():
        for s in range(0, len(x), batch_size):
            batch = _unit_rgb(x[s : s + batch_size], value_range)
            inputs = processor(images=list(batch), return_tensors="pt", do_rescale=False)
            feats.append(model(**inputs).pooler_output.double())
    return torch.cat(feats)


def fd_dinov2(
    samples: torch.Tensor, reference: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)
) -> float:
    """Frechet distance between DINOv2 features of samples and reference (FD-DINOv2)."""
    return frechet_distance(dinov2_features(samples, value_range), dinov2_features(reference, value_range))
