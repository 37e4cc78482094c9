"""Score samples (or reconstructions) against clean reference data, by metric name.

``evaluate_tensors`` works on tensors (what ``em-train``'s per-lap evaluation calls);
``evaluate_folders`` on diffem data folders (column ``x``, optional ``index``), streaming images
chunk by chunk. Defaults: vectors get ``sinkhorn`` and ``sliced_w2``; images get ``fd_rand`` and
``fd_pixels``, plus ``psnr`` and ``ssim`` when both sides carry an ``index`` column to pair
reconstructions with the clean images they recover (several samples per observation, as from
``reconstruct --per-observation N``, are averaged per observation first). ``posterior_folder``
scores such a folder of K draws per observation as a posterior
(:mod:`~diffem_cli.metrics.posterior_quality`): a trained sampler on held-out observations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffem_cli.core.errors import DiffemError
from diffem_cli.io.datameta import VECTOR, data_kind

VECTOR_DEFAULTS = ("sinkhorn", "sliced_w2")
IMAGE_DEFAULTS = ("psnr", "ssim", "fd_rand", "fd_pixels")
VECTOR_RANGE = (-2.0, 2.0)
IMAGE_RANGE = (-1.0, 1.0)
CHUNK = 1024


@dataclass(frozen=True)
class Metric:
    """A metric's name, the data it takes (``vector``/``image``), whether it pairs rows, and what it is."""

    name: str
    kinds: tuple[str, ...]
    paired: bool
    help: str
    lower_is_better: bool = True


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric(
            "sinkhorn",
            ("vector", "image"),
            False,
            "Sinkhorn divergence to the reference (manifold benchmark)",
        ),
        Metric("sliced_w2", ("vector", "image"), False, "sliced Wasserstein-2 distance (256 projections)"),
        Metric("psnr", ("image",), True, "PSNR (dB) of each sample against its clean image", False),
        Metric("ssim", ("image",), True, "SSIM of each sample against its clean image", False),
        Metric("fd_rand", ("image",), False, "Frechet distance in a fixed random-CNN feature space"),
        Metric("fd_pixels", ("image",), False, "Frechet distance on raw pixels"),
        Metric("fid", ("image",), False, "FID (opt-in: torchmetrics and local Inception weights)"),
        Metric("kid", ("image",), False, "KID, the kernel Inception distance (opt-in, as fid)"),
        Metric("is", ("image",), False, "Inception Score of the samples (opt-in, as fid)", False),
        Metric("fd_dinov2", ("image",), False, "Frechet distance in DINOv2 features (opt-in: local weights)"),
    )
}


class _Rows:
    """One side of a comparison: ``x`` rows (vectors or images) and, when present, their ``index``."""

    def __init__(
        self,
        n: int,
        shape: tuple[int, ...],
        index: torch.Tensor | None,
        read: Callable[[int, int], torch.Tensor],
        take: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        self.n, self.shape, self.index = n, shape, index
        self._read, self._take = read, take

    def chunks(self, size: int) -> Iterator[tuple[int, torch.Tensor]]:
        for start in range(0, self.n, size):
            yield start, self._read(start, min(start + size, self.n))

    def all(self) -> torch.Tensor:
        return self._read(0, self.n)

    def take(self, rows: torch.Tensor) -> torch.Tensor:
        return self._take(rows)


def _tensor_rows(x: torch.Tensor, index: torch.Tensor | None, name: str) -> _Rows:
    if not isinstance(x, torch.Tensor) or x.ndim < 2:
        raise DiffemError(f"{name} must be a tensor with a leading batch dimension")
    if len(x) == 0:
        raise DiffemError(f"{name} holds no rows")
    x = x.detach().cpu()
    if index is not None:
        index = torch.as_tensor(index).detach().cpu().long().reshape(-1)
        if len(index) != len(x):
            raise DiffemError(f"{name} has {len(x)} rows but {len(index)} index values")
    return _Rows(len(x), tuple(x.shape[1:]), index, lambda a, b: x[a:b].float(), lambda r: x[r].float())


def _folder_rows(path: Path, name: str) -> tuple[_Rows, dict[str, Any]]:
    from diffem_cli.io.store import columns, read_dataset

    ds, manifest = read_dataset(Path(path))
    if "x" not in ds.column_names:
        raise DiffemError(f"{name} {path} has no column 'x' (columns: {', '.join(ds.column_names)})")
    if len(ds) == 0:
        raise DiffemError(f"{name} {path} holds no rows")
    index = columns(ds, ["index"])["index"].long().reshape(-1) if "index" in ds.column_names else None
    shape = tuple(columns(ds, ["x"], 0, 1)["x"].shape[1:])
    numpy_x = ds.with_format("numpy", columns=["x"])

    def take(rows: torch.Tensor) -> torch.Tensor:
        order = torch.argsort(rows)
        got = torch.from_numpy(numpy_x[rows[order].tolist()]["x"]).float()
        out = torch.empty_like(got)
        out[order] = got
        return out

    return _Rows(len(ds), shape, index, lambda a, b: columns(ds, ["x"], a, b)["x"].float(), take), manifest


def _kind(shape: tuple[int, ...]) -> str:
    kind = data_kind(shape)
    if kind == VECTOR or (len(shape) == 3 and shape[0] in (1, 3)):
        return kind
    raise DiffemError(f"rows must be vectors (n,) or images (C, H, W) with C = 1 or 3, got shape {shape}")


def _choose(names: Sequence[str] | None, kind: str, paired: bool) -> list[str]:
    if names is None:
        chosen = list(VECTOR_DEFAULTS if kind == VECTOR else IMAGE_DEFAULTS)
        return [n for n in chosen if paired or not METRICS[n].paired]
    if isinstance(names, str):
        names = names.split(",")
    chosen = []
    for raw in names:
        name = raw.strip().lower()
        if not name:
            continue
        if name not in METRICS:
            raise DiffemError(f"unknown metric {name!r} (available: {', '.join(METRICS)})")
        metric = METRICS[name]
        if kind not in metric.kinds:
            raise DiffemError(
                f"metric {name!r} needs {' or '.join(k + 's' for k in metric.kinds)}; the data are {kind}s"
            )
        if metric.paired and not paired:
            raise DiffemError(
                f"metric {name!r} pairs each sample with its clean image by the 'index' column, "
                "which both the samples and the reference need"
            )
        if name not in chosen:
            chosen.append(name)
    if not chosen:
        raise DiffemError("no metric given")
    return chosen


def _pairing(s_index: torch.Tensor, r_index: torch.Tensor, what: str = "reference") -> torch.Tensor:
    """For each sample row, the ``what`` (reference) row with the same index."""
    r_sorted, order = torch.sort(r_index)
    if len(r_sorted) > 1 and bool((r_sorted[1:] == r_sorted[:-1]).any()):
        dup = int(r_sorted[1:][r_sorted[1:] == r_sorted[:-1]][0])
        raise DiffemError(f"the {what} holds index {dup} more than once; cannot pair samples with it")
    pos = torch.searchsorted(r_sorted, s_index).clamp(max=len(r_sorted) - 1)
    missing = r_sorted[pos] != s_index
    if bool(missing.any()):
        raise DiffemError(f"sample index {int(s_index[missing][0])} has no {what} row with that index")
    return order[pos]


def _per_observation_mean(values: torch.Tensor, index: torch.Tensor) -> float:
    """Mean over observations of the mean over each observation's samples."""
    groups, inverse = torch.unique(index, return_inverse=True)
    sums = torch.zeros(len(groups), dtype=torch.float64).index_add_(0, inverse, values.double())
    counts = torch.zeros(len(groups), dtype=torch.float64).index_add_(
        0, inverse, torch.ones_like(values).double()
    )
    return float((sums / counts).mean())


def _evaluate(
    samples: _Rows,
    reference: _Rows,
    names: Sequence[str] | None,
    value_range: tuple[float, float] | None,
    n_points: int,
    seed: int,
    chunk: int,
    weights: Mapping[str, Any] | None = None,
) -> dict[str, float]:
    if samples.shape != reference.shape:
        raise DiffemError(f"samples have rows of shape {samples.shape}, the reference {reference.shape}")
    kind = _kind(samples.shape)
    paired = samples.index is not None and reference.index is not None
    chosen = _choose(names, kind, paired)
    vr = tuple(float(v) for v in (value_range or (VECTOR_RANGE if kind == VECTOR else IMAGE_RANGE)))
    if len(vr) != 2 or not vr[1] > vr[0]:
        raise DiffemError(f"value range must be (low, high) with high > low, got {value_range}")
    vr = (vr[0], vr[1])
    out: dict[str, float] = {}
    needs_all = [n for n in chosen if n in ("sinkhorn", "sliced_w2", "fid", "kid", "is", "fd_dinov2")]
    if needs_all:
        xs, xr = samples.all(), reference.all()
        for name in needs_all:
            out[name] = _whole(name, xs, xr, vr, n_points, seed, weights or {})
    paired_names = [n for n in chosen if METRICS[n].paired]
    if paired_names:
        out.update(_paired(samples, reference, paired_names, vr, chunk))
    fd_names = [n for n in chosen if n in ("fd_rand", "fd_pixels")]
    if fd_names:
        out.update(_frechet(samples, reference, fd_names, vr, seed, chunk))
    return {n: out[n] for n in chosen}


def _whole(
    name: str,
    xs: torch.Tensor,
    xr: torch.Tensor,
    vr: tuple[float, float],
    n_points: int,
    seed: int,
    weights: Mapping[str, Any],
) -> float:
    if name == "sinkhorn":
        from diffem_cli.metrics.sinkhorn import sinkhorn_divergence

        return sinkhorn_divergence(xs.flatten(1), xr.flatten(1), n_points=n_points, seed=seed)
    if name == "sliced_w2":
        from diffem_cli.metrics.sliced import sliced_wasserstein

        return sliced_wasserstein(xs.flatten(1), xr.flatten(1), seed=seed)
    from diffem_cli.metrics import online

    inception = weights.get("inception")
    if name == "fid":
        return online.fid(xs, xr, vr, weights=inception)
    if name == "kid":
        return online.kid(xs, xr, vr, weights=inception)
    if name == "is":
        return online.inception_score(xs, vr, weights=inception)
    return online.fd_dinov2(xs, xr, vr, weights=weights.get("dinov2"))


def _paired(
    samples: _Rows, reference: _Rows, names: list[str], vr: tuple[float, float], chunk: int
) -> dict[str, float]:
    from diffem_cli.metrics.images import psnr_per_image, ssim_per_image

    assert samples.index is not None and reference.index is not None
    ref_rows = _pairing(samples.index, reference.index)
    values = {n: torch.empty(samples.n, dtype=torch.float64) for n in names}
    for start, x in samples.chunks(chunk):
        ref = reference.take(ref_rows[start : start + len(x)])
        if "psnr" in values:
            values["psnr"][start : start + len(x)] = psnr_per_image(x, ref, vr)
        if "ssim" in values:
            values["ssim"][start : start + len(x)] = ssim_per_image(x, ref, vr)
    return {n: _per_observation_mean(v, samples.index) for n, v in values.items()}


def _frechet(
    samples: _Rows, reference: _Rows, names: list[str], vr: tuple[float, float], seed: int, chunk: int
) -> dict[str, float]:
    from diffem_cli.metrics.features import pixel_features, random_features
    from diffem_cli.metrics.frechet import Moments, frechet_from_moments

    extract = {
        "fd_rand": lambda x: random_features(x, vr, seed),
        "fd_pixels": lambda x: pixel_features(x, vr),
    }
    out = {}
    for name in names:
        moments = []
        for side in (samples, reference):
            acc = Moments()
            for _, x in side.chunks(chunk):
                acc.add(extract[name](x))
            moments.append(acc.result())
        out[name] = frechet_from_moments(*moments[0], *moments[1])
    return out


def evaluate_tensors(
    samples: torch.Tensor,
    reference: torch.Tensor,
    metrics: Sequence[str] | None = None,
    *,
    sample_index: torch.Tensor | None = None,
    reference_index: torch.Tensor | None = None,
    value_range: tuple[float, float] | None = None,
    n_points: int = 4096,
    seed: int = 0,
) -> dict[str, float]:
    """Metrics of ``samples`` against ``reference`` (same row shape), by name, in the order asked.

    ``metrics=None`` takes the defaults for the data kind (see the module docstring). Paired
    metrics (psnr, ssim) match rows whose ``sample_index`` equals the ``reference_index``.
    ``value_range`` is the data's range (default [-1, 1] for images); ``n_points`` the number of
    points per set of the Sinkhorn divergence; ``seed`` fixes its subsets and other random parts.
    """
    s = _tensor_rows(samples, sample_index, "samples")
    r = _tensor_rows(reference, reference_index, "reference")
    return _evaluate(s, r, metrics, value_range, n_points, seed, CHUNK)


def evaluate_folders(
    samples_dir: Path,
    reference_dir: Path,
    metrics: Sequence[str] | None = None,
    *,
    n_points: int = 4096,
    seed: int = 0,
    chunk_size: int = CHUNK,
    weights: Mapping[str, Any] | None = None,
) -> dict[str, float]:
    """``evaluate_tensors`` on two data folders (column ``x``; ``index`` pairs rows when both have it).

    The value range comes from the reference's manifest (else the samples', else the default for
    the data kind). Images are read ``chunk_size`` rows at a time for the paired and Frechet metrics.
    ``weights``: local network weights of the opt-in metrics, ``{"inception": path, "dinov2":
    path}`` (default: their environment variables, :mod:`~diffem_cli.metrics.online`).
    """
    s, s_manifest = _folder_rows(Path(samples_dir), "samples")
    r, r_manifest = _folder_rows(Path(reference_dir), "reference")
    value_range = r_manifest.get("value_range") or s_manifest.get("value_range")
    if value_range is not None:
        try:
            value_range = (float(value_range[0]), float(value_range[1]))
        except (TypeError, ValueError, IndexError):
            raise DiffemError(f"manifest value_range {value_range!r} is not [low, high]") from None
    if chunk_size < 1:
        raise DiffemError(f"chunk size must be >= 1, got {chunk_size}")
    return _evaluate(s, r, metrics, value_range, n_points, seed, chunk_size, weights)


def posterior_draws(samples_dir: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The draws of a folder holding several per observation (columns ``x``, ``index``, ``sample``,
    as ``reconstruct --per-observation K`` writes): ``(K, N, *shape)`` and the N indices, each
    draw's rows in the same index order; None when the folder holds one draw per observation.
    Uneven draws (an index missing from one draw, or repeated in it) are refused."""
    from diffem_cli.io.store import columns, read_dataset

    ds, _ = read_dataset(Path(samples_dir))
    if "sample" not in ds.column_names or "index" not in ds.column_names:
        return None
    cols = columns(ds, ["x", "index", "sample"])
    draw, index = cols["sample"].long().reshape(-1), cols["index"].long().reshape(-1)
    ids = torch.unique(draw)
    if len(ids) < 2:
        return None
    order = torch.argsort(draw * (int(index.max()) + 1) + index - int(index.min()))
    n = len(index) // len(ids)
    grid = index[order].reshape(len(ids), -1) if n * len(ids) == len(index) else None
    if grid is None or not bool((grid == grid[0]).all()) or len(torch.unique(grid[0])) != n:
        raise DiffemError(
            f"samples {samples_dir} do not hold the same observations in each of their {len(ids)} draws"
        )
    return cols["x"][order].float().reshape(len(ids), n, *cols["x"].shape[1:]), grid[0]


def posterior_folder(
    samples_dir: Path,
    reference_dir: Path,
    *,
    channel: Any = None,
    obs: dict[str, torch.Tensor] | None = None,
    obs_index: torch.Tensor | None = None,
) -> dict[str, float] | None:
    """:func:`~diffem_cli.metrics.posterior_quality.posterior_quality` of a folder of K draws per
    observation (:func:`posterior_draws`; None for one draw) against the clean reference paired by
    index, keys ``post_*``. With the observations (``channel``, their tensors ``obs`` and
    ``obs_index``), the entries they give exactly are left out of the calibration and the observed
    residual is added; without them only the errors of one draw and of the K-draw mean are
    reported, since calibration over exactly observed entries would count them as covered."""
    from diffem_cli.metrics.posterior_quality import posterior_quality

    drawn = posterior_draws(samples_dir)
    if drawn is None:
        return None
    draws, index = drawn
    r, manifest = _folder_rows(Path(reference_dir), "reference")
    if r.index is None:
        raise DiffemError(f"reference {reference_dir} has no index column to pair the draws with")
    if tuple(draws.shape[2:]) != r.shape:
        raise DiffemError(f"samples have rows of shape {tuple(draws.shape[2:])}, the reference {r.shape}")
    clean = r.take(_pairing(index, r.index))
    value_range = manifest.get("value_range") or (IMAGE_RANGE if draws.dim() == 5 else None)
    if obs is None or channel is None or obs_index is None:
        values = posterior_quality(draws, clean, value_range=value_range)
        values = {k: v for k, v in values.items() if not k.startswith(("coverage", "spread"))}
    else:
        rows = _pairing(index, torch.as_tensor(obs_index).long().reshape(-1), "observations")
        mine = {k: v[rows] for k, v in obs.items()}
        exact = channel.exact_entries(mine)
        values = posterior_quality(
            draws, clean, exact=exact, channel=channel, obs=mine, value_range=value_range
        )
    return {f"post_{k}": v for k, v in values.items()}
