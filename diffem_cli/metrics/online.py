"""Opt-in metrics that need extra packages and network weights: FID, KID, IS and FD-DINOv2.

They are the field's standard numbers but depend on pretrained networks (Inception through
torchmetrics/torch-fidelity, DINOv2 through transformers). diffem never downloads them: a user who
has the weights points at them, ``DIFFEM_INCEPTION_WEIGHTS`` (torch-fidelity's Inception file,
``pt_inception-2015-12-05-6726825d.pth``; torch-fidelity reads it with ``torch.load``) or
``DIFFEM_DINOV2`` (a local ``facebook/dinov2-base`` folder), or passes the path itself
(``weights=``, ``diffem evaluate --inception-weights`` / ``--dinov2``), which wins over the variable.
Asking for one without its package or weights raises a one-line ``DiffemError`` saying how to
enable it. They are never defaults.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from diffem_cli.core.errors import DiffemError
from diffem_cli.metrics.frechet import frechet_distance

DINOV2_MODEL = "facebook/dinov2-base"
INCEPTION_ENV = "DIFFEM_INCEPTION_WEIGHTS"
DINOV2_ENV = "DIFFEM_DINOV2"

_PACKAGE = {
    "fid": "pip install 'diffem[fid]'",
    "kid": "pip install 'diffem[fid]'",
    "is": "pip install 'diffem[fid]'",
    "fd_dinov2": "pip install 'diffem[dinov2]'",
}
_INCEPTION = (INCEPTION_ENV, "torch-fidelity's Inception weights file (pt_inception-2015-12-05-6726825d.pth)")
_WEIGHTS = {
    "fid": _INCEPTION,
    "kid": _INCEPTION,
    "is": _INCEPTION,
    "fd_dinov2": (DINOV2_ENV, f"a local copy of the {DINOV2_MODEL} model folder"),
}


Weights = str | Path | None


def weights_path(metric: str, given: Weights = None) -> str:
    """The local weights of ``metric``'s network: ``given``, else its environment variable; a
    one-line DiffemError saying how to enable the metric when neither names anything, or naming
    the path that does not exist."""
    env, what = _WEIGHTS[metric]
    value = str(given).strip() if given is not None else os.environ.get(env, "").strip()
    if not value:
        raise DiffemError(
            f"metric {metric!r} is off: diffem never downloads weights; set {env} to {what} "
            f"(and {_PACKAGE[metric]})"
        )
    if not Path(value).exists():
        source = f"weights {value}" if given is not None else f"{env}={value}"
        raise DiffemError(f"metric {metric!r}: {source} does not exist")
    return value


def _load(metric: str, make: Callable[[], Any]) -> Any:
    try:
        return make()
    except DiffemError:
        raise
    except (ImportError, OSError, RuntimeError, ValueError, TypeError) as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DiffemError(
            f"metric {metric!r} could not load its network ({type(e).__name__}: {detail}); "
            f"it needs {_PACKAGE[metric]} and {_WEIGHTS[metric][0]}"
        ) from None


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
    weights: Weights = None,
) -> float:
    """FID (torchmetrics ``FrechetInceptionDistance``, 2048-d pool features) of samples vs reference;
    ``weights``: the Inception file (default: its environment variable)."""
    path = weights_path("fid", weights)

    def make() -> Any:
        from torchmetrics.image.fid import FrechetInceptionDistance

        return FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=path)

    metric = _load("fid", make)
    _feed(metric, samples, reference, value_range, batch_size)
    return float(metric.compute())


def kid(
    samples: torch.Tensor,
    reference: torch.Tensor,
    value_range: tuple[float, float] = (-1.0, 1.0),
    batch_size: int = 256,
    weights: Weights = None,
) -> float:
    """KID (torchmetrics ``KernelInceptionDistance``: the mean over its subsets of the unbiased
    polynomial-kernel MMD on 2048-d Inception features), unbiased at small sample counts;
    ``weights`` as for :func:`fid`."""
    path = weights_path("kid", weights)
    subset = min(1000, len(samples), len(reference))

    def make() -> Any:
        from torchmetrics.image.kid import KernelInceptionDistance

        return KernelInceptionDistance(
            feature=2048, subset_size=subset, normalize=True, feature_extractor_weights_path=path
        )

    metric = _load("kid", make)
    _feed(metric, samples, reference, value_range, batch_size)
    mean, _ = metric.compute()
    return float(mean)


def _feed(metric: Any, samples: torch.Tensor, reference: torch.Tensor, value_range, batch_size: int) -> None:
    """Reference images as ``real``, samples as fake, in batches."""
    for s in range(0, len(reference), batch_size):
        metric.update(_unit_rgb(reference[s : s + batch_size], value_range), real=True)
    for s in range(0, len(samples), batch_size):
        metric.update(_unit_rgb(samples[s : s + batch_size], value_range), real=False)


def inception_score(
    samples: torch.Tensor,
    value_range: tuple[float, float] = (-1.0, 1.0),
    batch_size: int = 256,
    weights: Weights = None,
) -> float:
    """Inception Score (torchmetrics ``InceptionScore``, mean over its splits) of the samples;
    ``weights`` as for :func:`fid`."""
    path = weights_path("is", weights)

    def make() -> Any:
        from torchmetrics.image.inception import InceptionScore

        return InceptionScore(normalize=True, feature_extractor_weights_path=path)

    metric = _load("is", make)
    for s in range(0, len(samples), batch_size):
        metric.update(_unit_rgb(samples[s : s + batch_size], value_range))
    mean, _ = metric.compute()
    return float(mean)


def dinov2_features(
    x: torch.Tensor,
    value_range: tuple[float, float] = (-1.0, 1.0),
    batch_size: int = 64,
    weights: Weights = None,
) -> torch.Tensor:
    """DINOv2 (``facebook/dinov2-base``, from its local folder ``weights``, default its environment
    variable) class-token features of images, via transformers, offline."""
    path = weights_path("fd_dinov2", weights)

    def make() -> Any:
        from transformers import AutoImageProcessor, AutoModel

        local = {"local_files_only": True}
        return AutoImageProcessor.from_pretrained(path, **local), AutoModel.from_pretrained(
            path, **local
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
    samples: torch.Tensor,
    reference: torch.Tensor,
    value_range: tuple[float, float] = (-1.0, 1.0),
    weights: Weights = None,
) -> float:
    """Frechet distance between DINOv2 features of samples and reference (FD-DINOv2); ``weights``
    as for :func:`dinov2_features`."""
    feats = [dinov2_features(x, value_range, weights=weights) for x in (samples, reference)]
    return frechet_distance(*feats)
