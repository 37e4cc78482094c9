"""Clean-data sources: the manifold curve, digits, image folders, saved data sets, spec errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffem_cli.core.errors import DiffemError
from diffem_cli.io.sources import load_source, manifold_curve, sample_manifold
from diffem_cli.io.store import write_dataset


def _all(source) -> torch.Tensor:
    return torch.cat(list(source.batches(1000)))


def test_manifold_defaults_range_and_shape():
    src = load_source("manifold")
    x = _all(src)
    assert len(src) == 16384 and src.shape == (5,) and src.kind == "vector"
    assert x.shape == (16384, 5) and x.dtype == torch.float32
    assert src.value_range == (-2.0, 2.0)
    assert x.min() >= -2.0 and x.max() <= 2.0
    # min-max scaling: every coordinate nearly reaches both ends of [-2, 2]
    assert (x.min(0).values < -1.9).all() and (x.max(0).values > 1.9).all()
    assert src.describe()["spec"] == "manifold:samples=16384,n=5,seed=0,draw_seed=1"


def test_manifold_determinism_and_seeds():
    a = _all(load_source("manifold:samples=500,n=3,seed=4"))
    b = _all(load_source("manifold:samples=500,n=3,seed=4"))
    assert torch.equal(a, b) and a.shape == (500, 3)
    other_draws = _all(load_source("manifold:samples=500,n=3,seed=4,draw_seed=9"))
    assert not torch.allclose(a, other_draws)
    other_curve = _all(load_source("manifold:samples=500,n=3,seed=5,draw_seed=5"))
    assert not torch.allclose(a, other_curve)
    # same curve, other draws: points of one curve, so held-out z values map through the same function
    curve = manifold_curve(3, 4)
    z = np.random.default_rng(9).random(500)
    assert torch.equal(curve(z), other_draws)
    # the first points never depend on how many are drawn
    assert torch.equal(sample_manifold(100, 3, 4, 5), sample_manifold(300, 3, 4, 5)[:100])


def test_manifold_curve_is_smooth_and_one_dimensional():
    curve = manifold_curve(5, 0)
    z = torch.linspace(0, 1, 2001)
    x = curve(z)
    steps = (x[1:] - x[:-1]).norm(dim=1)
    assert steps.max() < 0.1  # continuous: nearby z give nearby x


def test_manifold_bad_options():
    with pytest.raises(DiffemError, match="no option 'dim'"):
        load_source("manifold:dim=3")
    with pytest.raises(DiffemError, match="integer"):
        load_source("manifold:n=two")


def test_digits_range_shape_and_limit():
    src = load_source("digits")
    x = _all(src)
    assert len(src) == 1797 and src.shape == (1, 8, 8) and src.kind == "image"
    assert x.min() == -1.0 and x.max() == 1.0
    # pixel values 0..16 map to multiples of 1/8 in [-1, 1]
    assert torch.equal((x + 1) * 8, ((x + 1) * 8).round())
    small = load_source("digits", limit=10)
    assert len(small) == 10 and torch.equal(_all(small), x[:10])
    assert small.describe()["n"] == 10
    cut = load_source("digits", skip=1790)
    assert len(cut) == 7 and cut.first == 1790 and torch.equal(_all(cut), x[1790:])
    inner = load_source("digits", skip=5, limit=3)
    assert inner.first == 5 and torch.equal(_all(inner), x[5:8]) and inner.describe()["skip"] == 5


def test_image_folder_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (5, 6, 3), dtype=np.uint8) for _ in range(5)]
    (tmp_path / "sub").mkdir()
    names = ["b.png", "a.png", "sub/c.png", "sub/d.bmp", "e.png"]
    for name, arr in zip(names, arrays, strict=True):
        Image.fromarray(arr).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    src = load_source(f"folder:{tmp_path}")
    assert src.shape == (3, 5, 6) and len(src) == 5
    x = torch.cat(list(src.batches(2)))
    order = sorted(range(5), key=lambda i: names[i])
    want = torch.from_numpy(np.stack([arrays[i] for i in order])).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert torch.allclose(x, want)
    assert torch.equal(_all(load_source(str(tmp_path))), x)


def test_image_folder_gray_and_size_mismatch(tmp_path):
    Image.fromarray(np.full((4, 4), 255, np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "b.png")
    src = load_source(str(tmp_path))
    assert src.shape == (1, 4, 4)
    assert _all(src)[:, 0, 0, 0].tolist() == [1.0, -1.0]
    Image.fromarray(np.zeros((3, 4), np.uint8)).save(tmp_path / "c.png")
    with pytest.raises(DiffemError, match=r"c\.png is 4x3.*resize"):
        load_source(str(tmp_path))
    # only the images used must agree: the first two are fine
    assert len(load_source(str(tmp_path), limit=2)) == 2
    assert _all(load_source(str(tmp_path), skip=1, limit=1))[:, 0, 0, 0].tolist() == [-1.0]


def test_saved_dataset_sources(tmp_path):
    import datasets

    x = torch.randn(30, 2, 3, 3)
    write_dataset(
        tmp_path / "clean", [{"x": x[:20]}, {"x": x[20:]}], {"kind": "clean", "value_range": [-3, 3]}
    )
    src = load_source(str(tmp_path / "clean"))
    assert src.shape == (2, 3, 3) and src.value_range == (-3, 3)
    assert torch.equal(_all(src), x)

    pixels = np.random.default_rng(1).integers(0, 256, (4, 7, 7, 3), dtype=np.uint8)
    ds = datasets.Dataset.from_dict(
        {"label": [0, 1, 2, 3], "img": [Image.fromarray(p) for p in pixels]},
        features=datasets.Features({"label": datasets.Value("int64"), "img": datasets.Image()}),
    )
    ds.save_to_disk(str(tmp_path / "hub"))
    src = load_source(str(tmp_path / "hub"))
    assert src.shape == (3, 7, 7)
    want = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert torch.allclose(_all(src), want)


def test_unknown_spec(tmp_path):
    builtins = r"not a built-in \(manifold, digits, patches\)"
    with pytest.raises(DiffemError, match=r"source 'nope' not found: " + builtins):
        load_source("nope")
    with pytest.raises(DiffemError, match="not found"):
        load_source(str(tmp_path / "missing"))
    with pytest.raises(DiffemError, match="no images"):
        load_source(str(tmp_path))


def test_hub_failure_is_one_line(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'x/y' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DiffemError, match="Hub could not be reached") as err:
        load_source("hf:x/y:test")
    assert "\n" not in str(err.value) and "split 'test'" in str(err.value)


def test_patches_are_natural_rgb_crops_reproducible_by_seed():
    src = load_source("patches:size=8,n=300,seed=3")
    x = _all(src)
    assert src.shape == (3, 8, 8) and src.kind == "image" and src.value_range == (-1.0, 1.0)
    assert x.shape == (300, 3, 8, 8) and x.min() >= -1.0 and x.max() <= 1.0
    assert torch.equal(x, _all(load_source("patches:size=8,n=300,seed=3")))
    assert not torch.equal(x, _all(load_source("patches:size=8,n=300,seed=4")))
    assert src.describe()["spec"] == "patches:size=8,n=300,seed=3,scale=4"
    # natural-image statistics: neighbouring pixels correlate strongly, unlike independent noise
    left, right = x[..., :-1].flatten(), x[..., 1:].flatten()
    assert float(torch.corrcoef(torch.stack([left, right]))[0, 1]) > 0.5


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("patches:size=1", "size must lie in"),
        ("patches:size=4000", "size must lie in"),
        ("patches:n=0", "must be >= 1"),
        ("patches:colour=1", "has no option 'colour'"),
    ],
)
def test_patches_options_are_checked(spec, message):
    with pytest.raises(DiffemError, match=message):
        load_source(spec)
