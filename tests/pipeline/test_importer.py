"""``import_observations``: observations held as files (PNG images and masks, a saved data set, a
safetensors file) come back as the observations ``corrupt`` wrote, and bad inputs are refused."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from diffem_channels.base import Channel, ChannelError, Observation, per_sample
from diffem_cli.core.errors import DiffemError
from diffem_cli.io.observations import Observations
from diffem_cli.io.registry import make_channel
from diffem_cli.io.sources import load_source
from diffem_cli.pipeline.corrupt import corrupt_dataset
from diffem_cli.pipeline.importer import import_observations

PNG_TOL = 2.0 / 255
"""One 8-bit step on [-1, 1] (1/255 of the range): PNG rounding moves a value by at most half of it."""


def _pixels(t: torch.Tensor) -> np.ndarray:
    """A ``(C, H, W)`` tensor in [-1, 1] as the 8-bit pixels a user's PNG holds."""
    v = ((t + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return v[0].numpy() if v.shape[0] == 1 else v.permute(1, 2, 0).numpy()


def _export_png(obs: Observations, root: Path) -> tuple[Path, Path]:
    """The observations as a user holds them: ``images/NNN.png`` and ``masks/NNN.png`` (white = observed)."""
    images, masks = root / "images", root / "masks"
    images.mkdir()
    masks.mkdir()
    for i in range(len(obs)):
        Image.fromarray(_pixels(obs.obs["y"][i])).save(images / f"{i:03d}.png")
        if "mask" in obs.obs:
            Image.fromarray((obs.obs["mask"][i, 0] * 255).to(torch.uint8).numpy()).save(
                masks / f"{i:03d}.png"
            )
    return images, masks


def _corrupt(
    root: Path, source: str, name: str, params: dict, limit: int = 8
) -> tuple[Channel, Observations]:
    channel = make_channel(name, params)
    corrupt_dataset(load_source(source, limit=limit), channel, root / "obs", progress=False)
    return channel, Observations(root / "obs")


@pytest.mark.parametrize(
    ("name", "params"),
    [("mask", {"rho": 0.5}), ("box", {}), ("blur", {"sigma": 0.8}), ("jpeg", {"quality": 30})],
)
def test_png_round_trip(tmp_path: Path, name: str, params: dict) -> None:
    channel, obs = _corrupt(tmp_path, "digits", name, params)
    images, masks = _export_png(obs, tmp_path)
    inputs = {"mask": masks} if "mask" in obs.obs else None
    manifest = import_observations(images, make_channel(name, params), tmp_path / "imp", inputs=inputs)
    back = Observations(tmp_path / "imp")  # verifies the checksum and the columns, like em-train
    assert manifest["channel"] == channel.spec() == back.channel.spec()
    assert manifest["files"] == [f"{i:03d}.png" for i in range(len(obs))]
    assert back.shape == obs.shape and torch.equal(back.index, torch.arange(len(obs)))
    assert set(back.obs) == set(obs.obs)
    assert float((back.obs["y"] - obs.obs["y"]).abs().max()) <= PNG_TOL
    if "mask" in obs.obs:
        assert torch.equal(back.obs["mask"], obs.obs["mask"])
        assert torch.equal(back.obs["y"] * (1 - back.obs["mask"]), torch.zeros_like(back.obs["y"]))


def test_dataset_columns_round_trip_exactly(tmp_path: Path) -> None:
    """Lossless columns: a noisy mask (y beyond [-1, 1]) and the noise channel come back bit for bit."""
    for name, params in [("mask", {"rho": 0.5, "sigma": 0.2}), ("noise", {"sigma": 0.3})]:
        root = tmp_path / name
        root.mkdir()
        _, obs = _corrupt(root, "digits", name, params)
        cols = {k: v.numpy() for k, v in obs.obs.items()}
        datasets.Dataset.from_dict({**cols, "file": [f"img{i}.png" for i in range(len(obs))]}).save_to_disk(
            str(root / "saved")
        )
        manifest = import_observations(root / "saved", make_channel(name, params), root / "imp")
        back = Observations(root / "imp")
        assert manifest["files"][0] == "img0.png"
        for k in obs.obs:
            assert torch.equal(back.obs[k], obs.obs[k]), (name, k)


def test_projection_from_safetensors_and_columns(tmp_path: Path) -> None:
    channel, obs = _corrupt(tmp_path, "manifold:samples=32", "projection", {"m": 3}, limit=32)
    save_file({"y": obs.obs["y"], "A": obs.obs["A"]}, str(tmp_path / "obs.safetensors"))
    import_observations(tmp_path / "obs.safetensors", make_channel("projection", {"m": 3}), tmp_path / "a")
    datasets.Dataset.from_dict({"y": obs.obs["y"].numpy()}).save_to_disk(str(tmp_path / "ys"))
    save_file({"matrices": obs.obs["A"]}, str(tmp_path / "A.safetensors"))
    import_observations(tmp_path / "ys", channel, tmp_path / "b", inputs={"A": tmp_path / "A.safetensors"})
    for out in ("a", "b"):
        back = Observations(tmp_path / out)
        assert back.shape == (5,) and back.value_range == [-2.0, 2.0]
        assert torch.equal(back.obs["y"], obs.obs["y"]) and torch.equal(back.obs["A"], obs.obs["A"])
    save_file({"A": 2 * obs.obs["A"]}, str(tmp_path / "A2.safetensors"))
    _refused(
        tmp_path,
        "rows must have unit norm",
        tmp_path / "ys",
        channel,
        inputs={"A": tmp_path / "A2.safetensors"},
    )
    save_file({"A": obs.obs["A"][:, :2].contiguous()}, str(tmp_path / "A_short.safetensors"))
    _refused(
        tmp_path,
        "need 'A' of shape",
        tmp_path / "ys",
        channel,
        inputs={"A": tmp_path / "A_short.safetensors"},
    )


class PerSampleNoise(Channel):
    """A test plugin: noise whose level ``s`` is drawn per sample and stored with the observation."""

    name = "per-sample-noise"
    linear = True

    def corrupt(self, x: torch.Tensor, seeds: torch.Tensor) -> Observation:
        s = 0.05 + 0.1 * per_sample(seeds, (), "rand")
        return {"y": x + s.view(-1, 1, 1, 1) * per_sample(seeds, tuple(x.shape[1:]), "randn", 1), "s": s}

    def condition(self, obs: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        return obs["y"]

    def cond_size(self, shape: tuple[int, ...]) -> int:
        return shape[0]


class Hidden(PerSampleNoise):
    """A non-linear channel with a tensor besides ``y`` and no declared import fields."""

    name = "hidden"
    linear = False


def test_per_sample_parameters_from_a_table(tmp_path: Path) -> None:
    channel = PerSampleNoise()
    corrupt_dataset(load_source("digits", limit=6), channel, tmp_path / "obs", progress=False)
    ds = datasets.load_from_disk(str(tmp_path / "obs")).with_format("torch")  # its channel is not registered
    y, s = ds["y"][:], ds["s"][:]
    images = tmp_path / "images"
    images.mkdir()
    lines = ["file,s"]
    for i in range(6):
        Image.fromarray(_pixels(y[i])).save(images / f"{i}.png")
        lines.append(f"{i}.png,{float(s[i])!r}")
    (tmp_path / "s.csv").write_text("\n".join(lines) + "\n")
    import_observations(images, channel, tmp_path / "imp", params_file=tmp_path / "s.csv")
    back = datasets.load_from_disk(str(tmp_path / "imp")).with_format("numpy")
    assert np.array_equal(back["s"], s.numpy())
    (tmp_path / "bad.csv").write_text("file,t\n" + "".join(f"{i}.png,1\n" for i in range(6)))
    with pytest.raises(DiffemError, match="unknown per-sample parameter 't'"):
        import_observations(images, channel, tmp_path / "bad", params_file=tmp_path / "bad.csv")
    with pytest.raises(DiffemError, match="cannot be imported: it is not linear"):
        import_observations(images, Hidden(), tmp_path / "hidden")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "hidden").exists()


@pytest.fixture
def masked(tmp_path: Path) -> tuple[Path, Path]:
    """Digits behind a noiseless mask, exported as PNG images and mask images."""
    _, obs = _corrupt(tmp_path, "digits", "mask", {"rho": 0.5})
    return _export_png(obs, tmp_path)


def _refused(tmp_path: Path, match: str, *args, **kwargs) -> None:
    out = tmp_path / "out"
    with pytest.raises(DiffemError, match=match) as info:
        import_observations(*args, out=out, **kwargs)
    assert "\n" not in str(info.value)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_refusals(tmp_path: Path, masked: tuple[Path, Path]) -> None:
    images, masks = masked
    mask = make_channel("mask", {"rho": 0.5})
    _refused(tmp_path, "needs 'mask'", images, mask)
    # the masks of other images: observed pixels where the mask says missing
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    for f in sorted(masks.iterdir()):
        Image.open(masks / "000.png" if f.name != "000.png" else masks / "001.png").save(swapped / f.name)
    _refused(tmp_path, "where its mask says missing", images, mask, inputs={"mask": swapped})
    # inverted masks (black = observed)
    inverted = tmp_path / "inverted"
    inverted.mkdir()
    for f in masks.iterdir():
        Image.fromarray(255 - np.asarray(Image.open(f))).save(inverted / f.name)
    _refused(tmp_path, "where its mask says missing", images, mask, inputs={"mask": inverted})
    # grey in a mask: out of its range
    grey = tmp_path / "grey"
    grey.mkdir()
    for f in masks.iterdir():
        Image.fromarray(np.full((8, 8), 128, np.uint8)).save(grey / f.name)
    _refused(tmp_path, "other than 0 and 1", images, mask, inputs={"mask": grey})
    # masks of another size
    small = tmp_path / "small"
    small.mkdir()
    for f in masks.iterdir():
        Image.fromarray(np.full((4, 4), 255, np.uint8)).save(small / f.name)
    _refused(
        tmp_path, r"shape \[1, 4, 4\], the channel needs \[1, 8, 8\]", images, mask, inputs={"mask": small}
    )
    # one mask short
    short = tmp_path / "short"
    short.mkdir()
    for f in sorted(masks.iterdir())[:-1]:
        (short / f.name).write_bytes(f.read_bytes())
    _refused(tmp_path, "holds 7 images", images, mask, inputs={"mask": short})
    _refused(tmp_path, "reads no 'A'", images, mask, inputs={"mask": masks, "A": masks})
    with pytest.raises(ChannelError, match="has no parameter 'quality'"):
        make_channel("mask", {"quality": 3})


def test_refuses_images_of_other_sizes_and_out_of_range_columns(tmp_path: Path, masked) -> None:
    images, _ = masked
    Image.fromarray(np.zeros((6, 6), np.uint8)).save(images / "999.png")
    _refused(tmp_path, "not 8x8", images, make_channel("blur", {}))
    y = np.full((4, 1, 8, 8), 200.0, np.float32)  # 8-bit values stored as floats: not diffem's scale
    datasets.Dataset.from_dict({"y": y}).save_to_disk(str(tmp_path / "raw"))
    _refused(tmp_path, "outside the data range", tmp_path / "raw", make_channel("blur", {}))
    _refused(tmp_path, "does not fit", tmp_path / "raw", make_channel("blur", {}), data_shape=(3, 8, 8))


def test_file_names_and_labels_are_carried(tmp_path: Path) -> None:
    """An image folder gives the column ``file_name``; a saved data set its ``file_name`` (or
    ``file``, ``path``) and ``label`` columns, a ClassLabel staying one."""
    _, obs = _corrupt(tmp_path, "digits", "mask", {"rho": 0.5})
    images, masks = _export_png(obs, tmp_path)
    import_observations(images, make_channel("mask", {"rho": 0.5}), tmp_path / "a", inputs={"mask": masks})
    back = Observations(tmp_path / "a")
    assert back.rows == {"file_name": [f"{i:03d}.png" for i in range(len(obs))]}
    assert set(back.obs) == {"y", "mask"}
    # diffem's own observations folder (labels of digits) imported again
    import_observations(tmp_path / "obs", make_channel("mask", {"rho": 0.5}), tmp_path / "b")
    again = Observations(tmp_path / "b")
    assert again.rows == obs.rows and again.rows["label"] == load_source("digits").columns(0, 8)["label"]
    assert again.row_features["label"].names == list("0123456789")
    cols = {k: v.numpy() for k, v in obs.obs.items()}
    names = {"path": [f"scan/{i}.png" for i in range(len(obs))], "label": ["a", "b"] * 4}
    datasets.Dataset.from_dict({**cols, **names}).save_to_disk(str(tmp_path / "saved"))
    import_observations(tmp_path / "saved", make_channel("mask", {"rho": 0.5}), tmp_path / "c")
    third = Observations(tmp_path / "c")
    assert third.rows == {"file_name": names["path"], "label": names["label"]}
    assert datasets.load_from_disk(str(tmp_path / "c")).features["label"] == datasets.Value("string")
