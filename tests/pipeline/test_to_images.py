"""``to-images``: diffem's image folders as a ``datasets.Image`` column of PNGs, missing pixels drawn
as asked, names and labels kept; vector data and existing outputs refused."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from helpers import error_line, run_ok

from diffem_cli.core.errors import DiffemError
from diffem_cli.io.observations import Observations
from diffem_cli.io.store import columns, read_manifest
from diffem_cli.pipeline.to_images import encode, to_images


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    run_ok("corrupt", "digits", root / "obs", "-c", "mask", "-p", "rho=0.5", "--limit", 12, "--clean-out",
           root / "clean")  # fmt: skip
    run_ok("corrupt", "digits", root / "blur", "-c", "blur", "--limit", 5)
    run_ok("corrupt", "manifold:samples=8", root / "mobs", "-c", "projection", "--clean-out", root / "mclean")
    return root


def test_observations_become_pngs_with_missing_pixels_transparent(d, tmp_path):
    manifest = to_images(d / "obs", tmp_path / "img")
    ds = datasets.load_from_disk(str(tmp_path / "img"))
    assert isinstance(ds.features["image"], datasets.Image)
    assert ds.column_names == ["image", "index", "label"]
    assert ds.features["label"].names == list("0123456789")
    obs = Observations(d / "obs")
    assert list(ds["label"]) == obs.rows["label"] and list(ds["index"]) == obs.index.tolist()
    first = ds[0]["image"]
    assert first.mode == "LA" and first.size == (8, 8)
    arr = np.asarray(first)
    seen = obs.obs["mask"][0, 0].numpy()
    assert np.array_equal(arr[..., 1], np.where(seen > 0.5, 255, 0))  # alpha is the mask
    y8 = ((obs.obs["y"][0, 0] + 1) * 127.5).round().numpy()
    assert np.array_equal(arr[..., 0][seen > 0.5], y8[seen > 0.5])  # observed values exact
    assert manifest["kind"] == "images" and manifest["images_of"] == "observations"
    assert manifest["missing"] == "transparent" and manifest["provenance"][-1]["command"] == "to-images"
    assert "Images" in ds.info.description and "to-images" in ds.info.description


def test_missing_red_and_grey(d, tmp_path):
    obs = Observations(d / "obs")
    gone = obs.obs["mask"][0, 0].numpy() < 0.5
    to_images(d / "obs", tmp_path / "red", missing="red")
    red = np.asarray(datasets.load_from_disk(str(tmp_path / "red"))[0]["image"])
    assert red.shape == (8, 8, 3) and (red[gone] == [255, 0, 0]).all()
    to_images(d / "obs", tmp_path / "grey", missing="grey")
    grey = np.asarray(datasets.load_from_disk(str(tmp_path / "grey"))[0]["image"])
    assert grey.shape == (8, 8) and (grey[gone] == 128).all()  # the stored 0, mid-grey
    with pytest.raises(DiffemError, match="--missing must be one of"):
        to_images(d / "obs", tmp_path / "x", missing="blue")


def test_clean_data_and_unmasked_observations_round_trip(d, tmp_path):
    to_images(d / "clean", tmp_path / "img")
    ds = datasets.load_from_disk(str(tmp_path / "img"))
    assert ds.column_names == ["image", "index", "label"]
    x = columns(datasets.load_from_disk(str(d / "clean")), ["x"])["x"]
    back = torch.from_numpy(np.stack([np.asarray(im) for im in ds["image"]])).float() / 127.5 - 1
    assert (back - x[:, 0]).abs().max() <= 1 / 255 + 1e-6  # within half an 8-bit step
    to_images(d / "blur", tmp_path / "blur")  # a blurred observation is an image, without alpha
    assert datasets.load_from_disk(str(tmp_path / "blur"))[0]["image"].mode == "L"
    # the folder is a source again (its image column)
    run_ok("corrupt", tmp_path / "img", tmp_path / "again", "-c", "noise")
    assert list(datasets.load_from_disk(str(tmp_path / "again"))["label"]) == list(ds["label"])


def test_encode_rgb_with_per_channel_mask():
    x = torch.zeros(1, 3, 2, 2)
    held = torch.ones(1, 3, 2, 2)
    held[0, :, 0, 0] = 0  # missing in every channel: transparent
    held[0, 0, 1, 1] = 0  # missing in one channel only: still shown
    from PIL import Image

    png = encode(x, (-1.0, 1.0), held)[0]
    import io

    arr = np.asarray(Image.open(io.BytesIO(png)))
    assert arr.shape == (2, 2, 4) and arr[0, 0, 3] == 0 and arr[1, 1, 3] == 255


def test_vector_data_is_refused(d, tmp_path):
    with pytest.raises(DiffemError, match="holds vector data"):
        to_images(d / "mclean", tmp_path / "a")
    with pytest.raises(DiffemError, match="observations of vector data .*projection"):
        to_images(d / "mobs", tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_existing_output_needs_force(d, tmp_path):
    to_images(d / "obs", tmp_path / "img")
    with pytest.raises(DiffemError, match="already exists"):
        to_images(d / "obs", tmp_path / "img")
    to_images(d / "clean", tmp_path / "img", force=True)
    assert read_manifest(tmp_path / "img")["images_of"] == "clean"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(DiffemError, match="holds files diffem did not write"):
        to_images(d / "obs", tmp_path / "mine", force=True)
    with pytest.raises(DiffemError, match="already holds images"):
        to_images(tmp_path / "img", tmp_path / "twice")


def test_cli_refusals_are_one_line(d, tmp_path, cli):
    code, _, err = cli("to-images", d / "mobs", tmp_path / "a")
    assert code == 2 and "not images" in error_line(err)
    code, _, err = cli("to-images", d / "obs", tmp_path / "img")
    assert code == 0 and "wrote 12 images of observations" in err
    code, _, err = cli("to-images", d / "obs", tmp_path / "img")
    assert code == 2 and "use --force" in error_line(err)
    code, _, err = cli("to-images", tmp_path / "nowhere", tmp_path / "b")
    assert code == 2 and "does not exist" in error_line(err)
    assert cli("to-images", d / "obs", tmp_path / "img", "--force", "--missing", "red")[0] == 0
