"""File names and labels travel with the data: image folder -> corrupt -> em-train -> reconstruct
(and ``--png --png-single``, ``to-images``), each row with the name of the file its observation came from."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pytest
from helpers import TINY_UNET, fast_em_lap, run_ok
from PIL import Image

from diffem_cli.io.store import columns


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("names")
    rng = np.random.default_rng(0)
    for i in range(16):
        folder = root / "pics" / ("cats" if i % 2 else "dogs")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(folder / f"pic {i:02d}.png")
    run_ok(
        "corrupt", root / "pics", root / "obs", "-c", "mask", "-p", "rho=0.5", "--clean-out", root / "clean"
    )
    fast_em_lap(root / "obs", root / "run", "--set", "em.init=observation", *TINY_UNET)
    run_ok(
        "reconstruct",
        root / "run/checkpoints/lap_001.safetensors",
        root / "obs",
        root / "rec",
        "--steps",
        4,
        "--per-observation",
        2,
        "--png",
        root / "png",
        "--png-single",
    )
    return root


def _names(folder: Path) -> tuple[list[str], list[int]]:
    ds = datasets.load_from_disk(str(folder))
    return list(ds["file_name"]), columns(ds, ["index"])["index"].tolist()


def test_file_names_survive_corrupt_em_train_and_reconstruct(chain):
    files = sorted(p.relative_to(chain / "pics").as_posix() for p in (chain / "pics").rglob("*.png"))
    names, index = _names(chain / "obs")
    assert names == files and index == list(range(16))
    assert datasets.load_from_disk(str(chain / "obs")).features["file_name"] == datasets.Value("string")
    assert _names(chain / "clean") == (files, index)
    by_index = dict(zip(index, names, strict=True))
    for lap in (0, 1):
        rec_names, rec_index = _names(chain / "run" / "recon" / f"lap_{lap:03d}")
        assert [by_index[i] for i in rec_index] == rec_names
    rec_names, rec_index = _names(chain / "rec")
    assert len(rec_names) == 32 and [by_index[i] for i in rec_index] == rec_names


def test_png_files_are_named_after_the_source_files(chain):
    pngs = sorted(p.name for p in (chain / "png").iterdir())
    assert len(pngs) == 32
    assert pngs[:3] == ["000000_0_cats-pic-01.png", "000000_1_cats-pic-01.png", "000001_0_cats-pic-03.png"]
    assert "000008_1_dogs-pic-00.png" in pngs
    # a rerun with --force replaces the folder it wrote
    run_ok(
        "reconstruct",
        chain / "run/checkpoints/lap_001.safetensors",
        chain / "obs",
        chain / "rec2",
        "--steps",
        4,
        "--png",
        chain / "png",
        "--png-single",
        "--force",
    )
    assert len(list((chain / "png").iterdir())) == 16


def test_to_images_of_reconstructions_keeps_names(chain, tmp_path):
    run_ok("to-images", chain / "rec", tmp_path / "img")
    ds = datasets.load_from_disk(str(tmp_path / "img"))
    assert isinstance(ds.features["image"], datasets.Image)
    assert ds.column_names == ["image", "index", "sample", "file_name"]
    assert list(ds["file_name"]) == _names(chain / "rec")[0]
