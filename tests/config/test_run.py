from functools import partial

import pytest

from diffem_cli.config.run import PRESETS, config_from_dict, missing_keys, parse_sets
from diffem_cli.config.run import load_config as load_bare
from diffem_cli.core.errors import DiffemError
from diffem_cli.methods import extensions, method_names

# what the CLI does: the option sections and method names come from the method registry
load_config = partial(load_bare, extensions=extensions())


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load(name):
    cfg = load_config(name)
    assert cfg.network["type"] in {"mlp", "unet"}
    assert cfg.train.epochs > 0


# a RUN's config.yaml: the core sections, the methods' option sections after em, then eval and seed
SECTIONS = [
    "network",
    "train",
    "sample",
    "em",
    "cond",
    "mmps",
    "dps",
    "ambient",
    "noise2self",
    "sure",
    "eval",
    "seed",
]


def test_manifold_preset_spreads_the_anchor_steps_over_more_laps():
    cfg = load_config("manifold")
    assert cfg.network == {"type": "mlp", "width": 256, "depth": 3, "emb_dim": 64}
    # 11 laps of 640 steps at 5e-3 (bench/results/manifold-budget-study.md), where the anchor ran 6
    # of 2,000 at 3e-3 (bench_manifold still does)
    assert cfg.train.batch_size == 1024 and cfg.train.epochs * (16384 // 1024) == 640 and cfg.em.laps == 11
    assert cfg.train.lr == 5e-3


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


@pytest.mark.parametrize(
    ("assignment", "match"),
    [
        ("train.epochs=0", "'train.epochs' must be an integer >= 1"),
        ("train.batch_size=0", "'train.batch_size'"),
        ("train.lr=-1", "'train.lr' must be > 0"),
        ("train.lr=.nan", "'train.lr' must be a finite number"),
        ("train.lr_min=1", "'train.lr_min'"),
        ("train.ema_decay=2", "'train.ema_decay' must be in \\[0, 1\\)"),
        ("train.ema_decay=1", "'train.ema_decay'"),
        ("train.warmup=-1", "'train.warmup'"),
        ("train.grad_clip=-1", "'train.grad_clip'"),
        ("train.weight_decay=-0.1", "'train.weight_decay'"),
        ("train.t_sampling=cosine", "'train.t_sampling' must be one of"),
        ("sample.steps=0", "'sample.steps' must be an integer in \\[1, 1000\\]"),
        ("sample.steps=1001", "'sample.steps'"),
        ("sample.sampler=euler", "'sample.sampler' must be one of dpm\\+\\+, ddim, ddpm"),
        ("sample.batch_size=0", "'sample.batch_size'"),
        ("em.laps=0", "'em.laps'"),
        ("em.method=magic", "'em.method' must be one of diffem, em-mmps"),
        ("em.init=random", "'em.init' must be one of auto, gaussian, observation"),
        ("em.gaussian_rank=0", "'em.gaussian_rank'"),
        ("em.recorrupt_every=-1", "'em.recorrupt_every'"),
        ("mmps.cg_iters=0", "'mmps.cg_iters'"),
        ("dps.scale=0", "'dps.scale' must be > 0"),
        ("dps.grid=[]", "'dps.grid' must be a non-empty list"),
        ("dps.grid=[1, -2]", "'dps.grid'"),
        ("dps.subset=0", "'dps.subset'"),
        ("dps.reset_last=-1", "'dps.reset_last'"),
        ("ambient.delta=1", "'ambient.delta' must be in \\[0, 1\\)"),
        ("eval.metrics=psnr,fidd", "'eval.metrics' must be one of .*did you mean 'fid'"),
        ("eval.n_points=0", "'eval.n_points'"),
        ("seed=-1", "'seed'"),
        ("network.type=transformer", "'network.type' must be one of mlp, unet"),
        ("network.widht=3", "unknown config key 'network.widht' for a unet"),
        ("network.sample_size=8", "set by diffem from the data"),
        ("network.norm_num_groups=5", "must divide every block_out_channels"),
        ("network.down_block_types=[DownBlock2D]", "lists 1 blocks"),
        ("network.down_block_types=[Nope2D, DownBlock2D]", "not a valid unet"),
        ("network.layers_per_block=0", "'network.layers_per_block'"),
    ],
)
def test_every_value_is_checked_when_loaded(assignment, match):
    with pytest.raises(DiffemError, match=match):
        load_config("digits", [assignment])


def test_mlp_network_against_its_constructor():
    with pytest.raises(DiffemError, match="for an mlp .*did you mean 'width'"):
        load_config("manifold", ["network.widht=3"])
    with pytest.raises(DiffemError, match="'network.depth'"):
        load_config("manifold", ["network.depth=0"])
    cfg = load_config("manifold", ["network.width=16", "dps.grid=0.5,2", "em.method=dps-em"])
    assert cfg.network["width"] == 16 and cfg.dps.grid == [0.5, 2.0] and cfg.em.method == "dps-em"


def test_methods_from_the_registry_and_valid_values_pass():
    names = method_names()
    baselines = ("ambient", "ambient-tweedie", "noise2self", "sure-score")
    assert names == ("diffem", "em-mmps", "naive", "oracle", "dps-em", *baselines)
    for method in names:
        assert load_config("digits", [f"em.method={method}"]).em.method == method
    with pytest.raises(DiffemError, match="'em.method' must be one of .*did you mean 'naive'"):
        load_config("digits", ["em.method=naiv"])


def test_option_sections_come_from_the_methods():
    cfg = load_config("digits", ["mmps.cg_iters=2", "dps.scale=7", "ambient.delta=0.3"])
    assert (cfg.mmps.cg_iters, cfg.dps.scale, cfg.ambient.delta) == (2, 7.0, 0.3)
    keys = list(cfg.to_dict())  # a RUN's config.yaml: the sections at top level, after em
    assert keys == SECTIONS
    with pytest.raises(DiffemError, match=r"unknown config key 'mmsp'.*did you mean 'mmps'"):
        load_config("digits", ["mmsp.cg_iters=2"])
    with pytest.raises(DiffemError, match="'mmps.covariance' must be one of"):
        load_config("digits", ["mmps.covariance=exact"])
    with pytest.raises(DiffemError, match="'ambient.delta' must be in"):
        load_config("digits", ["ambient.delta=1"])
    # the config layer alone knows no method: a method's section is an unknown key there
    with pytest.raises(DiffemError, match="unknown config key 'dps'"):
        load_bare("digits", ["dps.scale=7"])


def test_config_from_dict_validates_too():
    data = load_config("digits").to_dict()
    assert config_from_dict(data, extensions()).to_dict() == data
    data["train"]["epochs"] = 0
    with pytest.raises(DiffemError, match="'train.epochs'"):
        config_from_dict(data, extensions())


def test_missing_keys_are_those_a_written_config_lacks():
    full = load_config("img16").to_dict()
    assert missing_keys(full, full) == ()
    written = {**full, "em": dict(full["em"]), "network": {"type": "unet"}}
    del written["em"]["gaussian_shrinkage"], written["cond"], written["seed"]
    lacked = missing_keys(written, full)
    # the network section is the user's and never looked into; a lacked section lacks every key
    assert set(lacked) == {"em.gaussian_shrinkage", "seed", *(f"cond.{k}" for k in full["cond"])}


def test_check_config_for_data():
    from diffem_channels.jpeg import JpegChannel
    from diffem_channels.mask import MaskChannel
    from diffem_cli.config.run import check_config_for_data

    digits = load_config("digits")
    check_config_for_data(digits, MaskChannel(), (1, 8, 8))
    with pytest.raises(DiffemError, match="em.init=gaussian needs a linear channel"):
        check_config_for_data(load_config("digits", ["em.init=gaussian"]), JpegChannel(), (1, 8, 8))
    with pytest.raises(DiffemError, match="network.type=unet needs images"):
        check_config_for_data(digits, MaskChannel(), (5,))
    with pytest.raises(DiffemError, match="not divisible"):
        check_config_for_data(digits, MaskChannel(), (1, 9, 9))
    with pytest.raises(DiffemError, match="mlp needs vector data"):
        check_config_for_data(load_config("manifold"), MaskChannel(), (1, 8, 8))
    check_config_for_data(load_config("manifold"), None, (5,))
    # train.augment is refused on vector data before anything trains
    with pytest.raises(DiffemError, match="train.augment=hflip needs image columns"):
        check_config_for_data(load_config("manifold", ["train.augment=hflip"]), None, (5,))
    check_config_for_data(load_config("digits", ["train.augment=dihedral"]), MaskChannel(), (1, 8, 8))
    # a cosine Gaussian residual needs images
    with pytest.raises(DiffemError, match="em.gaussian_residual=cosine needs images"):
        check_config_for_data(load_config("manifold", ["em.gaussian_residual=cosine"]), None, (5,))
    cosine = load_config("digits", ["em.gaussian_residual=cosine"])
    check_config_for_data(cosine, MaskChannel(), (1, 8, 8))
    with pytest.raises(DiffemError, match="em.gaussian_residual=cosine holds a dense basis.*got 72x72"):
        check_config_for_data(cosine, MaskChannel(), (1, 72, 72))
    with pytest.raises(DiffemError, match="em.gaussian_residual"):
        load_config("digits", ["em.gaussian_residual=dct"])


def test_augmenting_images_under_a_vector_conditioning_is_refused_before_training():
    from diffem_channels.mask import MaskChannel
    from diffem_cli.config.run import check_config_for_data

    class FlatMask(MaskChannel):  # a plugin whose conditioning of images is a vector
        def condition(self, obs, shape):
            return super().condition(obs, shape).flatten(1)

    augmented = load_config("digits", ["train.augment=hflip"])
    with pytest.raises(DiffemError, match=r"needs image columns \(N, C, H, W\); conditioning is not one"):
        check_config_for_data(augmented, FlatMask(), (1, 8, 8))
    check_config_for_data(load_config("digits"), FlatMask(), (1, 8, 8))


def test_em_train_refuses_augmenting_vector_data_with_nothing_written(cli, tmp_path):
    from helpers import error_line

    code, _, err = cli("corrupt", "manifold", tmp_path / "obs", "-c", "projection", "--limit", 32)
    assert code == 0, err
    code, _, err = cli("em-train", tmp_path / "obs", tmp_path / "run", "--set", "train.augment=hflip")
    assert code == 2 and "train.augment=hflip needs image columns" in error_line(err)
    assert not (tmp_path / "run").exists()


def test_config_show(cli, tmp_path):
    import yaml

    code, out, err = cli("config", "show", "manifold", "--set", "train.epochs=3")
    assert code == 0, err
    shown = yaml.safe_load(out)
    assert shown["train"]["epochs"] == 3 and shown["network"]["type"] == "mlp"
    assert set(shown) == set(SECTIONS)
    code, out, err = cli("config", "show")
    assert code == 0 and yaml.safe_load(out)["network"]["type"] == "unet"  # digits by default
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(shown))
    code, out, err = cli("config", "show", run)
    assert code == 0 and yaml.safe_load(out) == shown
    partial = tmp_path / "mine.yaml"
    partial.write_text("train:\n  lr: 0.01\n")
    code, out, err = cli("config", "show", partial)
    assert code == 0 and yaml.safe_load(out)["train"]["lr"] == 0.01
    for argv, match in [
        (("config", "show", "digits", "--set", "train.epochs=0"), "'train.epochs'"),
        (("config", "show", tmp_path / "nope"), "neither a preset"),
        (("config", "show", tmp_path), "without config.yaml"),
    ]:
        code, out, err = cli(*argv)
        assert code == 2 and len(err.strip().splitlines()) == 1 and match in err, err
