"""Per-row metadata (file names, labels): what sources give, how data folders store them, and that
folders without them read as before."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from diffem_cli.core.errors import DiffemError
from diffem_cli.io import rowmeta
from diffem_cli.io.observations import Observations, save_recon
from diffem_cli.io.sources import TensorSource, load_source
from diffem_cli.io.store import columns, read_dataset, read_manifest, verify_dataset, write_dataset
from diffem_cli.pipeline.corrupt import corrupt_dataset


def _pictures(root, names):
    rng = np.random.default_rng(0)
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (6, 5), dtype=np.uint8)).save(root / name)


def test_image_folder_gives_relative_file_names_in_row_order(tmp_path):
    _pictures(tmp_path, ["b/2.png", "a/1.png", "a/10.png", "c.png"])
    src = load_source(str(tmp_path))
    assert src.columns(0, 4) == {"file_name": ["a/1.png", "a/10.png", "b/2.png", "c.png"]}
    assert src.columns(1, 3) == {"file_name": ["a/10.png", "b/2.png"]}
    limited = load_source(str(tmp_path), limit=2)
    assert limited.columns(0, 10) == {"file_name": ["a/1.png", "a/10.png"]}


def test_digits_give_their_targets_as_class_labels():
    from sklearn.datasets import load_digits

    src = load_source("digits")
    assert src.columns(0, len(src))["label"] == load_digits().target.tolist()
    assert src.label_names == tuple("0123456789")
    limited = load_source("digits", limit=5)
    assert limited.columns(0, 9) == {"label": [0, 1, 2, 3, 4]} and limited.label_names == src.label_names


@pytest.mark.parametrize("spec", ["manifold:samples=8", "patches:n=4,size=4"])
def test_sources_without_metadata_give_none(spec):
    assert load_source(spec).columns(0, 4) == {}


@pytest.mark.parametrize("name_column", ["file_name", "path", "file"])
def test_saved_dataset_gives_its_name_and_label_columns(tmp_path, name_column):
    images = [Image.new("L", (4, 4), v) for v in (0, 100, 200)]
    ds = datasets.Dataset.from_dict(
        {"image": images, name_column: ["x/a.png", "b.png", "c.png"], "label": [2, 0, 1]},
        features=datasets.Features(
            {
                "image": datasets.Image(),
                name_column: datasets.Value("string"),
                "label": datasets.ClassLabel(names=["cat", "dog", "owl"]),
            }
        ),
    )
    ds.save_to_disk(str(tmp_path / "set"))
    src = load_source(str(tmp_path / "set"))
    assert src.columns(0, 3) == {"file_name": ["x/a.png", "b.png", "c.png"], "label": [2, 0, 1]}
    assert src.columns(2, 9) == {"file_name": ["c.png"], "label": [1]}
    assert src.label_names == ("cat", "dog", "owl")


def test_columns_of_other_types_are_not_metadata(tmp_path):
    ds = datasets.Dataset.from_dict(
        {"x": np.zeros((3, 2), np.float32), "path": [1, 2, 3], "label": [0.5] * 3}
    )
    ds.save_to_disk(str(tmp_path / "set"))
    src = load_source(str(tmp_path / "set"))
    assert src.columns(0, 3) == {} and src.label_names is None


def test_check_rows_refuses_what_is_not_a_name_or_label():
    ok = rowmeta.check_rows({"file_name": ["a.png"], "label": [np.int64(3)]}, 1, "src")
    assert ok == {"file_name": ["a.png"], "label": [3]} and type(ok["label"][0]) is int
    missing = {"file_name": [None, "a.png"], "label": [None, 1]}  # rows without one
    assert rowmeta.check_rows(missing, 2, "src") == missing
    for rows, message in [
        ({"file_name": ["a"]}, "1 values of 'file_name' for 2 rows"),
        ({"file_name": ["a", ""]}, "file name .. is not a non-empty string"),
        ({"file_name": ["a", 3]}, "file name 3 is not a non-empty string"),
        ({"label": [1, "cat"]}, "labels mix integers and strings"),
        ({"label": [1, 2.5]}, "label 2.5 is not a whole number"),
        ({"label": [True, 1]}, "neither an integer nor a string"),
        ({"score": [1, 2]}, "'score' is not a row column"),
    ]:
        with pytest.raises(DiffemError, match=message):
            rowmeta.check_rows(rows, 2, "src")
    with pytest.raises(DiffemError, match="mix"):
        TensorSource(torch.zeros(2, 3), rows={"label": [1, "a"]})


def test_safe_stem_and_tensor_names():
    assert rowmeta.safe_stem("cats/Tom 01.jpg") == "cats-Tom-01"
    assert rowmeta.safe_stem("../../étrange.png") == "trange"
    assert rowmeta.safe_stem("noext") == "noext" and rowmeta.safe_stem("???.png") == "image"
    assert rowmeta.tensor_names(["y", "mask", "index", "file_name", "label"]) == ["y", "mask"]


def test_write_dataset_stores_names_labels_and_class_labels(tmp_path):
    chunks = [
        {"x": torch.zeros(2, 3), "file_name": ["a.png", "b.png"], "label": [1, 0]},
        {"x": torch.ones(1, 3), "file_name": ["c.png"], "label": [1]},
    ]
    feats = rowmeta.features({"file_name": ["a"], "label": [1]}, ("no", "yes"))
    write_dataset(tmp_path / "out", iter(chunks), {"kind": "clean", "data_shape": [3]}, features=feats)
    ds, manifest = read_dataset(tmp_path / "out")
    verify_dataset(tmp_path / "out", manifest)
    assert ds.features["file_name"] == datasets.Value("string")
    assert ds.features["label"].names == ["no", "yes"]
    assert list(ds["file_name"]) == ["a.png", "b.png", "c.png"] and list(ds["label"]) == [1, 0, 1]
    with pytest.raises(DiffemError, match="'file_name' holds string values, not numbers"):
        columns(ds, ["file_name"])
    # without given features: strings and integers by their values
    write_dataset(tmp_path / "plain", iter([{"x": torch.zeros(1, 3), "label": ["cat"]}]), {"kind": "clean"})
    assert datasets.load_from_disk(str(tmp_path / "plain")).features["label"] == datasets.Value("string")


def test_observations_and_reconstructions_carry_the_rows(tmp_path):
    src = load_source("digits", limit=20)
    corrupt_dataset(src, _mask(), tmp_path / "obs", clean_out=tmp_path / "clean", progress=False)
    data = Observations(tmp_path / "obs")
    assert set(data.obs) == {"y", "mask"}  # names and labels never reach a channel or a method
    assert data.rows == {"label": src.columns(0, 20)["label"]}
    assert data.row_features["label"].names == list("0123456789")
    clean = datasets.load_from_disk(str(tmp_path / "clean"))
    assert list(clean["label"]) == data.rows["label"]
    save_recon(tmp_path / "rec", torch.zeros(20, 1, 8, 8), data.index, {}, rows=data.rows,
               row_features=data.row_features)  # fmt: skip
    rec = datasets.load_from_disk(str(tmp_path / "rec"))
    assert list(rec["label"]) == data.rows["label"] and rec.features["label"].names == list("0123456789")


def test_an_observations_folder_without_the_new_columns_still_loads(tmp_path):
    """A folder as diffem wrote it before file names and labels were carried: y, mask, index only."""
    x = load_source("digits", limit=12).read(0, 12)
    channel = _mask()
    from diffem_channels import sample_seeds

    obs = channel.corrupt(x, sample_seeds(0, list(range(12))))
    manifest = {
        "kind": "observations",
        "channel": channel.spec(),
        "seed": 0,
        "data_shape": [1, 8, 8],
        "data_kind": "image",
        "value_range": [-1.0, 1.0],
    }
    write_dataset(tmp_path / "old", iter([{**obs, "index": torch.arange(12)}]), manifest)
    ds = datasets.load_from_disk(str(tmp_path / "old"))
    assert ds.column_names == ["y", "mask", "index"]
    data = Observations(tmp_path / "old")
    assert data.rows == {} and data.row_features == {} and len(data) == 12
    assert torch.equal(data.obs["y"], obs["y"])
    save_recon(tmp_path / "rec", x, data.index, {}, rows=data.rows, row_features=data.row_features)
    assert datasets.load_from_disk(str(tmp_path / "rec")).column_names == ["x", "index"]
    assert read_manifest(tmp_path / "rec")["kind"] == "reconstructions"


def _mask():
    from diffem_cli.io.registry import make_channel

    return make_channel("mask", {"rho": 0.5})
