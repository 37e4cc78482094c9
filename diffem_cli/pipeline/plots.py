"""PNG figures: image grids, pairwise scatter plots of vectors, metric curves.

Figures are drawn with matplotlib's Agg canvas directly (no pyplot, no global backend state)
and written atomically: to a temporary file beside the target, then renamed into place. Curves
also go to a PDF beside the PNG (vector graphics for a paper; no creation date, so a redrawn
figure of the same numbers is the same file). In image grids, entries an observation does not
hold are hatched in red, so that they never pass for real dark or grey pixels; row labels get the
room they need; a posterior-spread row is a heat map with its colour bar. Curve panels say which
way is better and put laps on integer ticks. ``--png`` grids caption every tile with its index.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

MIN_TILE = 64
GAP = 2
HATCH = ((214, 39, 40), (255, 235, 235))
"""The two colours of the diagonal stripes drawn over missing entries (red on pale pink)."""
HATCH_WIDTH = 3
"""Width of one stripe, in screen pixels (narrower where an image pixel is drawn smaller)."""
LABEL_SIZE = 9
SPREAD_CMAP = "viridis"
"""The colour map of posterior-spread rows (perceptually uniform, dark for no spread)."""
SCALE_LABEL = "std per pixel"
"""The label left of the spread rows' colour bar."""
CAPTION = 14
"""Height, in pixels, of the caption strip under each tile of a ``--png`` grid."""
FLOOR_LINE = "real vs real"
"""The monitor's reference line: ``obs_sw2_floor``, the same distance between two halves of the real
observations, the score of a perfect model up to sampling noise (not a lower bound: a lap may dip
below it by that noise)."""
REFERENCE_LINES = (FLOOR_LINE,)
"""Line names drawn as references (grey, dashed) in curve panels, not as series of their own."""
MONITOR_BETTER = {"obs_sw2": "lower"}
"""Which way is better for the label-free monitor's curves (``observed_residual`` should meet the
noise level, neither way)."""
TITLES = {
    "sinkhorn": "Sinkhorn divergence",
    "sliced_w2": "sliced W2",
    "psnr": "PSNR (dB)",
    "ssim": "SSIM",
    "fd_rand": "FD, random-CNN features",
    "fd_pixels": "FD, pixels",
    "fid": "FID",
    "kid": "KID",
    "is": "Inception Score",
    "fd_dinov2": "FD, DINOv2 features",
    "obs_sw2": "obs SW2 (label-free)",
    "obs_sw2_floor": "obs SW2 floor",
    "observed_residual": "observed residual",
}
"""The readable title of every metric key (evaluation metrics, the label-free monitor's fields),
for figure panels and table columns."""


def _save(
    fig: Figure, path: Path, dpi: int = 100, pdf: bool = False, text: Mapping[str, str] | None = None
) -> Path:
    """Write ``fig`` as the PNG ``path`` (and, with ``pdf``, a PDF beside it), atomically; ``text``:
    entries of the PNG's text chunks."""
    path = Path(path)
    FigureCanvasAgg(fig)
    targets = [(path, "png")] + ([(path.with_suffix(".pdf"), "pdf")] if pdf else [])
    for target, fmt in targets:
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
        try:
            meta = {"CreationDate": None} if fmt == "pdf" else dict(text) if text else None
            fig.savefig(tmp, format=fmt, dpi=dpi, metadata=meta)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return path


def metric_title(metric: str) -> str:
    """The readable title of a metric key (``psnr`` or ``eval_psnr``: ``PSNR (dB)``); an unknown
    key is its own title."""
    name = metric.removeprefix("eval_")
    return TITLES.get(name, name)


def better(metric: str) -> str | None:
    """``"higher"`` or ``"lower"``: which way is better for an evaluation metric (``psnr``,
    ``eval_psnr``) or a monitor field (``obs_sw2``); None when neither is."""
    from diffem_cli.metrics.evaluate import METRICS

    name = metric.removeprefix("eval_")
    if name in METRICS:
        return "lower" if METRICS[name].lower_is_better else "higher"
    return MONITOR_BETTER.get(name)


def _integer_ticks(ax: Axes, xs: Sequence[float]) -> None:
    """Whole-number ticks on the x axis when every x is a whole number (laps, seeds)."""
    if xs and all(float(x).is_integer() for x in xs):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _tile_size(h: int, w: int, size: int) -> tuple[int, int]:
    """The drawn size of an ``h x w`` image whose longer side becomes ``size``."""
    return round(h * size / max(h, w)), round(w * size / max(h, w))


def _spread_map(spread: torch.Tensor) -> torch.Tensor:
    """Per-entry posterior std ``(B, C, H, W)`` (or ``(B, H, W)``) -> one value per pixel ``(B, 1, H, W)``:
    the mean over channels."""
    s = spread.detach().float().cpu()
    return s.unsqueeze(1) if s.dim() == 3 else s.mean(dim=1, keepdim=True)


def _heat_tiles(spread: torch.Tensor, size: int, vmax: float) -> np.ndarray:
    """Per-pixel spread ``(B, 1, H, W)`` -> uint8 RGB tiles, :data:`SPREAD_CMAP` over ``[0, vmax]``."""
    out_size = _tile_size(*spread.shape[-2:], size)
    s = torch.nn.functional.interpolate(spread, size=out_size, mode="nearest")[:, 0].numpy()
    rgba = colormaps[SPREAD_CMAP](np.clip(s / vmax, 0.0, 1.0))
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def _tiles(
    batch: torch.Tensor,
    size: int,
    value_range: tuple[float, float],
    max_cols: int,
    observed: torch.Tensor | None = None,
) -> np.ndarray:
    """A batch ``(B, C, H, W)`` -> uint8 RGB tiles ``(B', size, size', 3)`` upscaled by nearest;
    entries that ``observed`` (0/1, broadcastable to the batch) marks 0 in every channel hatched."""
    x = batch.detach().float().cpu()[:max_cols]
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.shape[1] != 3:
        x = x[:, :1].expand(-1, 3, -1, -1)
    lo, hi = value_range
    x = ((x - lo) / (hi - lo)).clamp(0, 1)
    h, w = x.shape[-2:]
    out_size = _tile_size(h, w, size)
    x = torch.nn.functional.interpolate(x, size=out_size, mode="nearest")
    tiles = (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    if observed is not None:
        seen = observed.detach().float().cpu()[: len(tiles)]
        seen = seen.reshape(len(seen), -1, *seen.shape[-2:]).amax(dim=1, keepdim=True)
        missing = torch.nn.functional.interpolate(seen, size=out_size, mode="nearest")[:, 0].numpy() < 0.5
        rows, cols = np.indices(out_size)
        width = max(1, min(HATCH_WIDTH, out_size[0] // (2 * h)))  # stripes inside every pixel
        stripe = ((rows + cols) // width) % 2 == 0
        pattern = np.where(stripe[..., None], np.array(HATCH[0], np.uint8), np.array(HATCH[1], np.uint8))
        tiles[missing] = np.broadcast_to(pattern, tiles.shape)[missing]
    return tiles


def observation_row(
    channel: Any, obs: Mapping[str, torch.Tensor], shape: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Observations as a row of an image grid: ``y`` and, for a channel that hides entries
    (``masked_observation``), which entries it holds (1) or not (0); None when ``y`` is not an
    image of the data's ``shape`` (a projection, say)."""
    y = obs.get("y")
    if y is None or tuple(y.shape[1:]) != tuple(shape) or len(shape) != 3:
        return None
    held = channel.observation_mask(obs) if getattr(channel, "masked_observation", False) else None
    return y, held


def _label_width(fig: Figure, labels: Sequence[str]) -> float:
    """Inches the widest of ``labels`` takes at the grid's label size."""
    renderer = FigureCanvasAgg(fig).get_renderer()
    widths = [fig.text(0, 0, s, fontsize=LABEL_SIZE).get_window_extent(renderer).width for s in labels]
    for text in list(fig.texts):
        text.remove()
    return max(widths, default=0.0) / fig.dpi


def save_image_grid(
    rows: Sequence[torch.Tensor],
    path: Path,
    labels: Sequence[str] | None = None,
    value_range: tuple[float, float] = (-1.0, 1.0),
    max_cols: int = 16,
    observed: Sequence[torch.Tensor | None] | None = None,
    spread: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """One row of images per batch ``(B, C, H, W)``, labelled on the left.

    Three channels show as RGB, any other count as the first channel in grey; small images are
    upscaled (nearest) to at least 64 px, and rows of different sizes are shown at one size.
    ``observed[i]``, when given for row ``i``, marks the entries its images hold (1) or miss (0):
    missing ones are hatched in red, and a note under the grid says so. ``spread`` maps a label to
    the posterior standard deviation of the first observations ``(B, C, H, W)``: a heat-map row
    each (mean over channels, at most as many tiles as the widest image row), on one scale from 0
    to the largest value shown, whose colour bar is drawn under the grid.
    """
    held = list(observed or [])
    held += [None] * (len(rows) - len(held))
    names = [str(v) for v in (labels or [])][: len(rows)]
    names += [""] * (len(rows) - len(names))
    kept = [i for i, r in enumerate(rows) if len(r)]
    rows, held, names = [rows[i] for i in kept], [held[i] for i in kept], [names[i] for i in kept]
    if not rows:
        raise ValueError("save_image_grid needs at least one non-empty row")
    size = max(MIN_TILE, *(max(r.shape[-2:]) for r in rows))
    tiles = [_tiles(r, size, value_range, max_cols, m) for r, m in zip(rows, held, strict=True)]
    cols = max(len(t) for t in tiles)
    heat = {k: _spread_map(v[:cols]) for k, v in (spread or {}).items() if len(v)}
    vmax = max((float(v.max()) for v in heat.values()), default=0.0) or 1.0  # all zero: any scale
    tiles += [_heat_tiles(v, size, vmax) for v in heat.values()]
    names += list(heat)
    tile_h = max(t.shape[1] for t in tiles)
    tile_w = max(t.shape[2] for t in tiles)
    canvas = np.full((len(tiles) * (tile_h + GAP) + GAP, cols * (tile_w + GAP) + GAP, 3), 255, np.uint8)
    for i, row in enumerate(tiles):
        for j, tile in enumerate(row):
            top, left = GAP + i * (tile_h + GAP), GAP + j * (tile_w + GAP)
            canvas[top : top + tile.shape[0], left : left + tile.shape[1]] = tile
    fig = Figure()
    shown = [*names, SCALE_LABEL] if heat else names
    margin = _label_width(fig, shown) + 0.15 if any(shown) else 0.1
    note = 0.22 if any(m is not None for m in held) else 0.0
    bar = 0.45 if heat else 0.0  # the colour bar of the spread rows, its ticks below it
    below = 0.1 + note + bar
    grid_w, grid_h = canvas.shape[1] / 100, canvas.shape[0] / 100
    fig_w, fig_h = grid_w + margin + 0.05, grid_h + 0.1 + below
    fig.set_size_inches(fig_w, fig_h)
    ax = fig.add_axes((margin / fig_w, below / fig_h, grid_w / fig_w, grid_h / fig_h))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([GAP + i * (tile_h + GAP) + tile_h / 2 for i in range(len(tiles))])
    ax.set_yticklabels(names, fontsize=LABEL_SIZE)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if heat:
        top = note + 0.42
        cax = fig.add_axes((margin / fig_w, (top - 0.12) / fig_h, min(grid_w, 4.0) / fig_w, 0.12 / fig_h))
        scale = ScalarMappable(Normalize(0.0, vmax), colormaps[SPREAD_CMAP])
        fig.colorbar(scale, cax=cax, orientation="horizontal")
        cax.xaxis.set_major_locator(MaxNLocator(4))
        cax.tick_params(labelsize=LABEL_SIZE - 2, length=2, pad=1)
        fig.text(
            (margin - 0.08) / fig_w,
            (top - 0.06) / fig_h,
            SCALE_LABEL,
            fontsize=LABEL_SIZE,
            ha="right",
            va="center",
        )
    if note:
        fig.text(
            margin / fig_w,
            0.06 / fig_h,
            "red hatching: entries the observation does not hold",
            fontsize=LABEL_SIZE - 1,
            color="#b02020",
        )
    return _save(fig, path)


def save_tile_grid(
    images: torch.Tensor,
    path: Path,
    captions: Sequence[str],
    title: str,
    value_range: tuple[float, float] = (-1.0, 1.0),
    cols: int = 8,
    names: Sequence[str] | None = None,
) -> Path:
    """Images ``(B, C, H, W)`` in rows of ``cols``, each captioned underneath (its index), under
    ``title``; small images upscaled (nearest) to at least 64 px. ``names``, one per image, go to
    the PNG's text chunk ``diffem:tiles`` (a JSON list, in tile order), for programs."""
    if not len(images) or len(captions) != len(images):
        raise ValueError("save_tile_grid needs images and one caption each")
    tiles = _tiles(images, max(MIN_TILE, *images.shape[-2:]), value_range, len(images))
    tile_h, tile_w = tiles.shape[1:3]
    cell_h, cell_w = tile_h + CAPTION + GAP, tile_w + GAP
    n_rows = -(-len(tiles) // cols)
    canvas = np.full((n_rows * cell_h + GAP, cols * cell_w + GAP, 3), 255, np.uint8)
    for k, tile in enumerate(tiles):
        top, left = GAP + (k // cols) * cell_h, GAP + (k % cols) * cell_w
        canvas[top : top + tile_h, left : left + tile_w] = tile
    grid_w, grid_h = canvas.shape[1] / 100, canvas.shape[0] / 100
    fig_w, fig_h = grid_w + 0.2, grid_h + 0.45
    fig = Figure(figsize=(fig_w, fig_h))
    ax = fig.add_axes((0.1 / fig_w, 0.1 / fig_h, grid_w / fig_w, grid_h / fig_h))
    ax.imshow(canvas, interpolation="nearest")
    ax.axis("off")
    for k, caption in enumerate(captions):
        top, left = GAP + (k // cols) * cell_h, GAP + (k % cols) * cell_w
        ax.text(left + tile_w / 2, top + tile_h + 1, caption, fontsize=LABEL_SIZE - 2, ha="center", va="top")
    fig.text(0.1 / fig_w, 1 - 0.08 / fig_h, title, fontsize=LABEL_SIZE, va="top")
    text = {"diffem:tiles": json.dumps(list(names))} if names is not None else None
    return _save(fig, path, text=text)


def _pairs(n: int, dims: Sequence[int] | None) -> list[tuple[int, int]]:
    chosen = list(dims) if dims is not None else list(range(n if n <= 5 else 4))
    chosen = [d for d in chosen if d < n]
    return list(itertools.combinations(chosen, 2))


def save_pairwise_scatter(
    sets: Mapping[str, torch.Tensor],
    path: Path,
    max_points: int = 4096,
    dims: Sequence[int] | None = None,
    lim: tuple[float, float] | None = (-3.0, 3.0),
) -> Path:
    """One row of pairwise scatter panels per point set ``(m, n)``.

    ``dims`` picks the coordinates (default: all when ``n <= 5``, else the first four); every
    pair of them is one panel. Sets with a single coordinate show a histogram. ``lim=None``
    scales the axes to the points. The first ``max_points`` points of each set are drawn.
    """
    if not sets:
        raise ValueError("save_pairwise_scatter needs at least one point set")
    data = {k: v.detach().float().cpu().reshape(len(v), -1)[:max_points].numpy() for k, v in sets.items()}
    panels = {k: _pairs(v.shape[1], dims) or [(0, 0)] for k, v in data.items()}
    cols = max(len(p) for p in panels.values())
    fig = Figure(figsize=(2.4 * cols, 2.5 * len(data)))
    axes = fig.subplots(len(data), cols, squeeze=False)
    for i, (name, pts) in enumerate(data.items()):
        for j in range(cols):
            ax = axes[i][j]
            if j >= len(panels[name]):
                ax.axis("off")
                continue
            a, b = panels[name][j]
            if a == b:
                ax.hist(pts[:, a], bins=64, range=lim, color="C0")
                ax.set_xlabel(f"dim {a}")
            else:
                ax.scatter(pts[:, a], pts[:, b], s=1.0, alpha=0.5, linewidths=0, rasterized=True)
                ax.set_xlabel(f"dim {a}", labelpad=1)
                ax.set_ylabel(f"dim {b}", labelpad=1)
                if lim is not None:
                    ax.set_xlim(*lim)
                    ax.set_ylim(*lim)
                    # shared limits: ticks on the first column and the last row tell them for all
                    # (every axis's ticks were most of a figure's cost)
                    if j > 0:
                        ax.set_yticks([])
                    if i < len(data) - 1:
                        ax.set_xticks([])
                ax.set_aspect("equal", adjustable="box")
            ax.tick_params(labelsize=6)
            ax.locator_params(nbins=4)  # fewer tick labels: drawing them was most of a figure's cost
            if j == 0:
                ax.set_title(name, loc="left", fontsize=9)
    # fixed margins: tight_layout measured every label of every panel again (about as long as drawing)
    width, height = fig.get_size_inches()
    fig.subplots_adjust(
        left=0.55 / width,
        right=1 - 0.1 / width,
        bottom=0.5 / height,
        top=1 - 0.3 / height,
        wspace=0.45,
        hspace=0.5,
    )
    return _save(fig, path)


def save_curves(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    path: Path,
    xlabel: str,
    ylabel: str,
    logy: bool = False,
    title: str | None = None,
) -> Path:
    """Metric curves, one line per name, from ``(x, y)`` points (e.g. Sinkhorn divergence per lap)."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for name, points in curves.items():
        pts = sorted((float(x), float(y)) for x, y in points)
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="o", markersize=3, label=name)
    _integer_ticks(ax, [float(x) for points in curves.values() for x, _ in points])
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if curves:
        ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return _save(fig, path, pdf=True)


def _legend_columns(labels: Sequence[str], width: float) -> int:
    """Columns of a figure legend of ``labels`` (fontsize 8) that fit ``width`` inches: at most 6,
    fewer when long labels would run past the figure's edges."""
    # an entry: its marker and gaps (about 0.45 in) plus about 0.07 in per character at 8 points
    entry = 0.45 + 0.07 * max((len(s) for s in labels), default=0)
    return max(1, min(len(labels), 6, int(width // entry)))


def save_curve_panels(
    panels: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]],
    path: Path,
    xlabel: str,
    errors: Mapping[str, Mapping[str, Mapping[float, float]]] | None = None,
) -> Path:
    """One panel per metric key (``psnr``, ``obs_sw2``), one line per name in each (e.g. every
    method's metric per lap); ``errors[metric][name][x]``, when given, the half-height of an error
    bar at ``x``. A panel is titled :func:`metric_title` and its y axis says which way is better
    (:func:`better`). Whole-number x values (laps) get whole-number ticks.

    A name drawn in several panels (a method) keeps one colour everywhere and the figure has one
    legend on top; otherwise a panel with several lines has its own legend. Reference lines
    (:data:`REFERENCE_LINES`, e.g. the monitor's floor) are grey and dashed.
    """
    if not panels:
        raise ValueError("save_curve_panels needs at least one panel")
    drawn = [[n for n, pts in curves.items() if pts] for curves in panels.values()]
    names = list(dict.fromkeys(n for lines in drawn for n in lines if n not in REFERENCE_LINES))
    shared = any(sum(n in lines for lines in drawn) > 1 for n in names)
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    order = [*names, *dict.fromkeys(n for lines in drawn for n in lines if n in REFERENCE_LINES)]
    ncol = _legend_columns(order, 4.2 * cols)
    top = 0.15 + 0.2 * -(-len(order) // ncol) if shared else 0.0
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows + top))
    axes = fig.subplots(rows, cols, squeeze=False)
    handles: dict[str, Any] = {}
    for k, (metric, curves) in enumerate(panels.items()):
        ax = axes[k // cols][k % cols]
        xs_all = [float(x) for points in curves.values() for x, _ in points]
        own = [n for n in curves if n not in REFERENCE_LINES]
        for name, points in curves.items():
            pts = sorted((float(x), float(y)) for x, y in points)
            if not pts:
                continue
            xs, ys = zip(*pts, strict=True)
            bars = (errors or {}).get(metric, {}).get(name)
            yerr = [bars.get(x, 0.0) for x in xs] if bars else None
            if name in REFERENCE_LINES:
                style: dict[str, Any] = {"color": "0.45", "linestyle": "--", "marker": None}
            else:
                colour = names.index(name) if shared else own.index(name)
                style = {"color": f"C{colour % 10}", "marker": "o", "markersize": 3, "capsize": 2}
            handles[name] = ax.errorbar(xs, ys, yerr=yerr, label=name, **style)
        ax.set_title(metric_title(metric), fontsize=10)
        ax.set_xlabel(xlabel)
        way = better(metric)
        if way:
            ax.set_ylabel(f"{way} is better {'↑' if way == 'higher' else '↓'}", fontsize=8)
        _integer_ticks(ax, xs_all)
        ax.grid(True, alpha=0.3)
        if not shared and sum(1 for points in curves.values() if points) > 1:
            ax.legend(fontsize=7)
    for k in range(len(panels), rows * cols):
        axes[k // cols][k % cols].axis("off")
    if shared:
        fig.legend(
            [handles[n] for n in order],
            order,
            loc="upper center",
            ncol=ncol,
            fontsize=8,
            frameon=False,
        )
    fig.tight_layout(rect=(0, 0, 1, 1 - top / fig.get_figheight()))
    return _save(fig, path, pdf=True)
