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


def test_missing_entries_are_hatched_in_red(tmp_path):
    """A hidden pixel is drawn in the hatch colours, never as the grey its zero value would be."""
    from diffem_cli.pipeline.plots import HATCH

    y = torch.zeros(2, 1, 8, 8)  # every value mid-grey, as a masked observation stores it
    held = torch.ones(2, 1, 8, 8)
    held[:, :, :4] = 0  # the top half is missing
    arr = np.asarray(_png(save_image_grid([y], tmp_path / "m.png", observed=[held])).convert("RGB"))
    red = (np.abs(arr.astype(int) - np.array(HATCH[0])).sum(axis=-1) < 30).sum()
    grey = (np.abs(arr.astype(int) - 128).sum(axis=-1) < 12).sum()
    assert red > 0.2 * grey > 0  # both halves show: red stripes over the missing one
    plain = np.asarray(_png(save_image_grid([y], tmp_path / "p.png")).convert("RGB"))
    assert (np.abs(plain.astype(int) - np.array(HATCH[0])).sum(axis=-1) < 30).sum() == 0


def test_long_labels_get_room(tmp_path):
    """The left margin grows with the longest label, so no label is clipped."""
    x = torch.rand(4, 1, 8, 8)
    short = _png(save_image_grid([x], tmp_path / "s.png", labels=["x"]))
    long = _png(save_image_grid([x], tmp_path / "l.png", labels=["ambient-tweedie unconditional samples"]))
    assert long.size[0] > short.size[0] + 150 and long.size[1] == short.size[1]


def test_spread_rows_are_a_heat_map_with_a_colour_bar(tmp_path):
    """A posterior-spread row is coloured by the spread colour map (grey image rows never are), one
    tile per image column at most, with its colour bar and scale label under the grid."""
    from matplotlib import colormaps

    from diffem_cli.pipeline.plots import SPREAD_CMAP

    x = torch.rand(4, 3, 8, 8) * 2 - 1
    spread = torch.zeros(6, 3, 8, 8)
    spread[:, :, 4:] = 0.5  # the bottom half spreads: the top half takes the lowest colour
    plain = _png(save_image_grid([x], tmp_path / "p.png", labels=["lap 3"]))
    heat = _png(
        save_image_grid([x], tmp_path / "h.png", labels=["lap 3"], spread={"posterior spread (K=8)": spread})
    )
    assert heat.size[0] > plain.size[0]  # the longer label gets its room
    assert heat.size[1] >= plain.size[1] + 64 + 40  # one more row of tiles, and the colour bar
    arr = np.asarray(heat.convert("RGB")).astype(int)
    for value in (0.0, 1.0):  # both ends of the scale are drawn: no spread, and the largest
        colour = np.array(colormaps[SPREAD_CMAP](value)[:3]) * 255
        assert (np.abs(arr - colour).sum(axis=-1) < 6).sum() > 4 * 32 * 64  # 4 half-tiles at least
    grey = _png(save_image_grid([x[:, :1]], tmp_path / "g.png"))
    rgb = np.asarray(grey.convert("RGB")).astype(int)
    assert (rgb.max(axis=-1) - rgb.min(axis=-1)).max() == 0  # grey images stay grey
    # at most as many spread tiles as the widest image row: 6 are drawn as 4
    four = {"posterior spread (K=8)": spread[:4]}
    assert _png(save_image_grid([x], tmp_path / "s.png", labels=["lap 3"], spread=four)).size == heat.size


def test_tile_grid_captions_and_names(tmp_path):
    """A ``--png`` grid: rows of 8 upscaled tiles under a title, the tiles' names in a text chunk."""
    import json

    from diffem_cli.pipeline.plots import save_tile_grid

    x = torch.rand(11, 1, 8, 8) * 2 - 1
    path = save_tile_grid(
        x, tmp_path / "t.png", [str(i) for i in range(11)], "draw 0", names=list("abcdefghijk")
    )
    img = _png(path)
    assert img.size[0] >= 8 * 64 and img.size[1] >= 2 * (64 + 14)  # two rows of 8 columns
    assert json.loads(img.text["diffem:tiles"]) == list("abcdefghijk")
    assert "diffem:tiles" not in _png(save_tile_grid(x[:1], tmp_path / "o.png", ["0"], "one")).text


def test_panels_say_which_way_is_better_and_write_a_pdf(tmp_path):
    from diffem_cli.pipeline.plots import better, save_curve_panels

    assert (better("eval_psnr"), better("fd_pixels"), better("obs_sw2"), better("observed_residual")) == (
        "higher",
        "lower",
        "lower",
        None,
    )
    panels = {"psnr": {"run": [(0, 10.0), (1, 12.0), (2, 13.0)]}, "fd_pixels": {"run": [(0, 3.0), (1, 2.0)]}}
    path = save_curve_panels(panels, tmp_path / "m.png", "lap")
    _png(path)
    pdf = path.with_suffix(".pdf")
    first = pdf.read_bytes()
    assert first.startswith(b"%PDF")
    save_curve_panels(panels, path, "lap")
    assert pdf.read_bytes() == first  # no creation date: the same numbers give the same file


def test_a_shared_legend_of_long_names_wraps_instead_of_running_off_the_figure(tmp_path):
    """Six long series names over two panels take several legend rows (a taller figure of the
    same width); six short ones fit one row."""
    from diffem_cli.pipeline.plots import save_curve_panels

    def figure(names: list[str]):
        curves = {n: [(0, float(i)), (1, float(i) + 1)] for i, n in enumerate(names)}
        path = tmp_path / f"{len(names[0])}.png"
        return _png(save_curve_panels({"psnr": curves, "fd_pixels": curves}, path, "lap"))

    short = figure([f"m{i}" for i in range(6)])
    long = figure([f"mask 0.5: a variant with a long name {i}" for i in range(6)])
    assert long.size[0] == short.size[0] and long.size[1] > short.size[1]


def test_every_metric_key_has_a_readable_title_on_its_panel(tmp_path, monkeypatch):
    """Evaluation metrics and the label-free monitor's fields (what report and compare draw) are
    titled from the one table, never by their raw keys."""
    from matplotlib.axes import Axes

    from diffem_cli.metrics.evaluate import METRICS
    from diffem_cli.pipeline.compare import MONITOR_KEYS
    from diffem_cli.pipeline.plots import FLOOR_LINE, TITLES, metric_title, save_curve_panels
    from diffem_cli.pipeline.report import MONITOR

    assert set(METRICS) | set(MONITOR_KEYS) | set(MONITOR) <= set(TITLES)
    assert metric_title("eval_psnr") == metric_title("psnr") == "PSNR (dB)"
    assert metric_title("seconds") == "seconds"
    drawn = []
    monkeypatch.setattr(Axes, "set_title", lambda self, text, **kw: drawn.append(text))
    panels = {"obs_sw2": {"a": [(0, 1.0)], FLOOR_LINE: [(0, 0.5)]}, "observed_residual": {"a": [(0, 0.1)]}}
    save_curve_panels(panels, tmp_path / "c.png", "lap")
    assert drawn == ["obs SW2 (label-free)", "observed residual"]
