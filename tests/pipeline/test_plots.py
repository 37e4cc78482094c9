"""Figures: each writer leaves one valid PNG and no temporary file."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from diffem_cli.pipeline.plots import save_curves, save_image_grid, save_pairwise_scatter


def _png(path) -> Image.Image:
    with Image.open(path) as img:
        img.load()
    assert img.format == "PNG"
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []
    return img


def test_image_grid_rows_and_upscaling(tmp_path):
    digits = torch.rand(20, 1, 8, 8) * 2 - 1
    rgb = torch.rand(3, 3, 16, 16) * 2 - 1
    odd = torch.rand(2, 4, 8, 8)  # four channels: the first is shown
    path = save_image_grid(
        [digits, rgb, odd], tmp_path / "g.png", labels=["clean", "rgb", "odd"], max_cols=16
    )
    img = _png(path)
    # 16 columns of >= 64 px tiles: tiny images were upscaled
    assert img.size[0] >= 16 * 64 and img.size[1] >= 3 * 64
    # a constant white image stays white after scaling from [-1, 1]
    white = save_image_grid([torch.ones(1, 3, 8, 8)], tmp_path / "w.png")
    arr = np.asarray(_png(white).convert("RGB"))
    assert (arr == 255).all(axis=-1).mean() > 0.9


def test_pairwise_scatter_sets_and_dims(tmp_path):
    sets = {"clean": torch.rand(5000, 5) * 4 - 2, "start": torch.randn(100, 5), "y": torch.randn(50, 2)}
    img = _png(save_pairwise_scatter(sets, tmp_path / "s.png"))
    few = _png(save_pairwise_scatter(sets, tmp_path / "f.png", dims=(0, 1), lim=None))
    assert img.size[0] > few.size[0]  # all 10 pairs vs one pair per row
    _png(save_pairwise_scatter({"line": torch.randn(30, 1)}, tmp_path / "h.png"))


def test_curves_overwrite_atomically(tmp_path):
    curves = {"diffem": [(0, 1.3), (1, 0.9), (2, 0.5)], "em-mmps": [(0, 1.2), (1, 0.6)]}
    path = save_curves(curves, tmp_path / "c.png", "lap", "Sinkhorn", logy=True, title="manifold")
    first = path.read_bytes()
    save_curves({"diffem": [(0, 2.0)]}, path, "lap", "Sinkhorn")
    assert path.read_bytes() != first
    _png(path)
