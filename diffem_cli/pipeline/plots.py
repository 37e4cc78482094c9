"""PNG figures: image grids, pairwise scatter plots of vectors, metric curves.

Figures are drawn with matplotlib's Agg canvas directly (no pyplot, no global backend state)
and written atomically: to a temporary file beside the target, then renamed into place.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

MIN_TILE = 64
GAP = 2


def _save(fig: Figure, path: Path, dpi: int = 100) -> Path:
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    FigureCanvasAgg(fig)
    try:
        fig.savefig(tmp, format="png", dpi=dpi)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _tiles(batch: torch.Tensor, size: int, value_range: tuple[float, float], max_cols: int) -> np.ndarray:
    """A batch ``(B, C, H, W)`` -> uint8 RGB tiles ``(B', size, size', 3)`` upscaled by nearest."""
    x = batch.detach().float().cpu()[:max_cols]
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.shape[1] != 3:
        x = x[:, :1].expand(-1, 3, -1, -1)
    lo, hi = value_range
    x = ((x - lo) / (hi - lo)).clamp(0, 1)
    h, w = x.shape[-2:]
    scale = size / max(h, w)
    x = torch.nn.functional.interpolate(x, size=(round(h * scale), round(w * scale)), mode="nearest")
    return (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def save_image_grid(
    rows: Sequence[torch.Tensor],
    path: Path,
    labels: Sequence[str] | None = None,
    value_range: tuple[float, float] = (-1.0, 1.0),
    max_cols: int = 16,
) -> Path:
    """One row of images per batch ``(B, C, H, W)``, labelled on the left.

    Three channels show as RGB, any other count as the first channel in grey; small images are
    upscaled (nearest) to at least 64 px, and rows of different sizes are shown at one size.
    """
    rows = [r for r in rows if len(r)]
    if not rows:
        raise ValueError("save_image_grid needs at least one non-empty row")
    size = max(MIN_TILE, *(max(r.shape[-2:]) for r in rows))
    tiles = [_tiles(r, size, value_range, max_cols) for r in rows]
    tile_h = max(t.shape[1] for t in tiles)
    tile_w = max(t.shape[2] for t in tiles)
    cols = max(len(t) for t in tiles)
    canvas = np.full((len(rows) * (tile_h + GAP) + GAP, cols * (tile_w + GAP) + GAP, 3), 255, np.uint8)
    for i, row in enumerate(tiles):
        for j, tile in enumerate(row):
            top, left = GAP + i * (tile_h + GAP), GAP + j * (tile_w + GAP)
            canvas[top : top + tile.shape[0], left : left + tile.shape[1]] = tile
    margin = 1.3 if labels else 0.1
    fig_w, fig_h = canvas.shape[1] / 100 + margin + 0.05, canvas.shape[0] / 100 + 0.2
    fig = Figure(figsize=(fig_w, fig_h))
    ax = fig.add_axes((margin / fig_w, 0.1 / fig_h, 1 - (margin + 0.05) / fig_w, 1 - 0.2 / fig_h))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([GAP + i * (tile_h + GAP) + tile_h / 2 for i in range(len(rows))])
    names = [str(v) for v in (labels or [])][: len(rows)]
    ax.set_yticklabels(names + [""] * (len(rows) - len(names)))
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    return _save(fig, path)


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
                ax.set_aspect("equal", adjustable="box")
            ax.tick_params(labelsize=6)
            if j == 0:
                ax.set_title(name, loc="left", fontsize=9)
    fig.tight_layout()
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
    return _save(fig, path)


def save_curve_panels(
    panels: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]], path: Path, xlabel: str
) -> Path:
    """One panel per metric, one line per name in each (e.g. every method's metric per lap)."""
    if not panels:
        raise ValueError("save_curve_panels needs at least one panel")
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for k, (title, curves) in enumerate(panels.items()):
        ax = axes[k // cols][k % cols]
        for name, points in curves.items():
            pts = sorted((float(x), float(y)) for x, y in points)
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="o", markersize=3, label=name)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for k in range(len(panels), rows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.tight_layout()
    return _save(fig, path)
