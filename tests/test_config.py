import pytest

from diffem_cli.config import PRESETS, load_config, parse_sets
from diffem_cli.errors import DiffemError


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load(name):
    cfg = load_config(name)
    assert cfg.network["type"] in {"mlp", "unet"}
    assert cfg.train.epochs > 0


def test_manifold_preset_is_the_anchor_budget():
    cfg = load_config("manifold")
    assert cfg.network == {"type": "mlp", "width": 256, "depth": 3, "emb_dim": 64}
    assert cfg.train.batch_size == 1024 and cfg.train.epochs * (16384 // 1024) == 2000


def test_set_overrides_and_types():
    cfg = load_config(
        "digits", ["train.lr=2e-4", "em.laps=3", "eval.metrics=psnr,ssim", "network.dropout=0.1"]
    )
    assert cfg.train.lr == 2e-4 and cfg.em.laps == 3 and cfg.eval.metrics == ["psnr", "ssim"]
    assert cfg.network["dropout"] == 0.1 and cfg.network["type"] == "unet"


def test_unknown_key_and_bad_type():
    with pytest.raises(DiffemError, match="unknown config key 'train.lrr'"):
        load_config("digits", ["train.lrr=1"])
    with pytest.raises(DiffemError, match="expects int"):
        load_config("digits", ["train.epochs=abc"])
    with pytest.raises(DiffemError, match="key=value"):
        parse_sets(["train.lr"])


def test_config_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epochs: 3\n")
    assert load_config(f).train.epochs == 3
    f.write_text("train: [1, 2\n")
    with pytest.raises(DiffemError, match="not valid YAML"):
        load_config(f)
    with pytest.raises(DiffemError, match="neither a preset"):
        load_config(tmp_path / "missing.yaml")
