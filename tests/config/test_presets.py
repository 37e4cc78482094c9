"""The CPU image presets (img16, img32) and the default preset picked from the data shape."""

from __future__ import annotations

import pytest
import torch

from diffem_cli.config.run import PRESETS, default_preset, load_config
from diffem_cli.diffusion.nets import build_network


@pytest.mark.parametrize(
    ("shape", "preset"),
    [
        ((5,), "manifold"),
        ((1, 8, 8), "digits"),
        ((3, 16, 16), "img16"),
        ((1, 16, 16), "img16"),
        ((3, 32, 32), "img32"),
        ((3, 64, 64), "digits"),
        ((3, 16, 32), "digits"),
    ],
)
def test_default_preset_follows_the_data_shape(shape, preset):
    assert default_preset(shape) == preset
    assert preset in PRESETS


@pytest.mark.parametrize(("preset", "size"), [("img16", 16), ("img32", 32)])
def test_image_presets_build_for_their_size(preset, size):
    cfg = load_config(preset)
    net = build_network(cfg.network, (3, size, size), 4)  # mask conditioning: y (3) + mask (1)
    x = torch.zeros(2, 3, size, size)
    with torch.no_grad():
        out = net(x, torch.tensor([10]), torch.zeros(2, 4, size, size))
    assert out.shape == x.shape


def test_em_train_picks_img16_for_16x16_images(tmp_path, cli):
    from diffem_cli.io.registry import make_channel
    from diffem_cli.io.sources import TensorSource
    from diffem_cli.pipeline.corrupt import corrupt_dataset

    x = torch.rand(8, 3, 16, 16) * 2 - 1
    corrupt_dataset(TensorSource(x), make_channel("mask", {"rho": 0.5}), tmp_path / "obs", progress=False)
    # one tiny lap; the RUN's config.yaml records the preset's network
    code, _, err = cli(
        "em-train",
        tmp_path / "obs",
        tmp_path / "run",
        "--laps",
        "1",
        "--set",
        "train.epochs=1",
        "--set",
        "sample.steps=1",
        "--set",
        "network.block_out_channels=[8,16,16]",
        "--set",
        "network.norm_num_groups=8",
    )
    assert code == 0, err
    import yaml

    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["network"]["down_block_types"] == load_config("img16").network["down_block_types"]
    assert saved["train"]["epochs"] == 1 and saved["sample"]["batch_size"] == 1024
