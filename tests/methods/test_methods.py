"""The method seam: every implemented method runs laps end to end and reconstructs from its
checkpoint; refusals are one line; checkpoints record their method."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import QUICK, TINY_MLP, TINY_UNET, error_line, read_x, run_ok, sets

from diffem_cli.core.errors import DiffemError
from diffem_cli.diffusion.checkpoint import load_checkpoint
from diffem_cli.methods import default_config, get_method, method_for_checkpoint, method_names

TRAIN = [*TINY_MLP, *sets("train.batch_size=64", "train.epochs=2"), *QUICK]


@pytest.fixture(scope="module")
def obs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("methods")
    run_ok(
        "corrupt",
        "manifold:samples=128",
        root / "obs",
        "--channel",
        "projection",
        "--clean-out",
        root / "clean",
    )
    return root


@pytest.mark.parametrize("name", ["diffem", "em-mmps", "oracle"])
def test_method_runs_laps_and_reconstructs(obs, tmp_path, cli, name):
    extra = ["--clean", obs / "clean"] if name == "oracle" else []
    laps = 2 if name == "em-mmps" else 1
    run_ok(
        "em-train",
        obs / "obs",
        tmp_path / "run",
        "--laps",
        laps,
        "--method",
        name,
        *TRAIN,
        *extra,
        "--eval-clean",
        obs / "clean",
    )
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    lap_records = [r for r in records if r["event"] == "lap"]
    assert [r["lap"] for r in lap_records] == list(range(laps + 1))
    assert all("eval_sinkhorn" in r for r in lap_records)
    assert all(r["obs_sw2"] > 0 and r["obs_sw2_floor"] > 0 for r in lap_records)  # label-free monitor
    for r in lap_records[1:]:  # 128 rows, batches of 64 (em-mmps trains on those inside its box)
        assert r["examples"] == 64 * r["steps"] and r["estep_forwards"] == 128 * r["nfe"]
    last = tmp_path / f"run/checkpoints/lap_{laps:03d}.safetensors"
    ckpt = load_checkpoint(last)
    assert ckpt.meta["method"] == name
    assert ckpt.meta["kind"] == ("unconditional" if name == "em-mmps" else "conditional")
    assert ckpt.meta["cond_size"] == (0 if name == "em-mmps" else 2 + 10 + 5 + 25)
    if name == "em-mmps":  # lap 1 starts fresh, lap 2 fine-tunes it: both trained, both different
        first = load_checkpoint(tmp_path / "run/checkpoints/lap_001.safetensors").tensors
        assert first.keys() == ckpt.tensors.keys()
        assert any(not torch.equal(first[k], ckpt.tensors[k]) for k in first)
    code, _, err = cli(
        "reconstruct",
        last,
        obs / "obs",
        tmp_path / "rec",
        "--steps",
        3,
    )
    assert code == 0, err
    x = read_x(tmp_path / "rec")
    assert x.shape == (128, 5) and torch.isfinite(x).all()


def test_lap_seeds_mix_the_run_seed_with_the_lap():
    from diffem_cli.methods.base import lap_seed

    assert lap_seed(0, 2, "mstep") != lap_seed(1, 1, "mstep")  # seed + lap gave both 2
    assert lap_seed(0, 2, "mstep") != lap_seed(0, 2, "moments")
    assert lap_seed(3, 1, "mstep") == lap_seed(3, 1, "mstep")


def test_oracle_redraws_its_corruptions_as_diffem_does(obs):
    from diffem_cli.io.observations import Observations, load_clean

    data = Observations(obs / "obs")
    clean = load_clean(obs / "clean", data)
    cfg = default_config()
    cfg.em.recorrupt_every = 0
    assert get_method("oracle", cfg).mstep(data, clean, 1, 1, clean, cfg).refresh is None
    cfg.em.recorrupt_every = 2
    oracle = get_method("oracle", cfg)
    assert oracle.config_record(cfg) == {
        "cond": {
            "gaussian_mean": "auto",
            "residual": "auto",
            "residual_sigma_floor": 0.0,
            "gaussian_shrinkage": "auto",
        },
        "em": {"recorrupt_every": 2},
    }
    step = oracle.mstep(data, clean, 1, 1, clean, cfg)
    assert step.refresh is not None and torch.equal(step.tensors["x"], clean)
    first, again, other = step.refresh(1), step.refresh(1), step.refresh(2)
    assert torch.equal(first["cond"], again["cond"])  # the same draw for the same (seed, lap, r)
    assert not torch.equal(first["cond"], other["cond"])
    assert not torch.equal(first["cond"], step.tensors["cond"])


def test_oracle_without_clean_data_is_refused(obs, tmp_path, cli):
    code, _, err = cli("em-train", obs / "obs", tmp_path / "run", "--method", "oracle", *TRAIN)
    assert code == 2 and "--clean" in error_line(err) and not (tmp_path / "run").exists()


def test_unknown_and_unimplemented_methods_are_one_line(obs, tmp_path, cli):
    code, _, err = cli("em-train", obs / "obs", tmp_path / "run", "--method", "magic", *TRAIN)
    assert code == 2 and "magic" in error_line(err) and "diffem" in error_line(err)
    assert not (tmp_path / "run").exists()


def test_naive_needs_observations_of_the_data_shape(obs, tmp_path, cli):
    code, _, err = cli("em-train", obs / "obs", tmp_path / "run", "--method", "naive", *TRAIN)
    assert code == 2 and "naive" in error_line(err) and not (tmp_path / "run").exists()


def test_naive_trains_on_the_observations(tmp_path):
    run_ok("corrupt", "digits", tmp_path / "obs", "--channel", "mask", "--limit", 32)
    run_ok(
        "em-train",
        tmp_path / "obs",
        tmp_path / "run",
        "--laps",
        1,
        "--method",
        "naive",
        *TINY_UNET,
        *sets("train.batch_size=16", "train.epochs=1"),
        *QUICK,
    )
    assert load_checkpoint(tmp_path / "run/checkpoints/lap_001.safetensors").meta["method"] == "naive"


def test_mmps_methods_refuse_a_non_linear_channel(tmp_path, cli):
    run_ok("corrupt", "digits", tmp_path / "obs", "--channel", "jpeg", "--limit", 16)
    code, _, err = cli(
        "em-train", tmp_path / "obs", tmp_path / "run", "--method", "em-mmps", *TINY_UNET, *QUICK
    )
    assert code == 2 and "linear" in error_line(err) and not (tmp_path / "run").exists()
    # naive serves JPEG through DPS (its differentiable codec) instead of MMPS
    run_ok(
        "em-train",
        tmp_path / "obs",
        tmp_path / "naive",
        "--laps",
        1,
        "--method",
        "naive",
        *TINY_UNET,
        *sets("train.batch_size=16", "train.epochs=1"),
        *QUICK,
    )
    manifest = json.loads((tmp_path / "naive/recon/lap_001/diffem.json").read_text())
    assert manifest["dps_scale"] == default_config().dps.scale


def test_method_for_checkpoint_restores_its_settings():
    cfg = default_config()
    cfg.mmps.cg_iters = 5
    m = get_method("em-mmps", cfg)
    meta = {"kind": "unconditional", "method": m.name, "method_config": m.config_record(cfg)}
    assert method_for_checkpoint(meta).options["mmps"].cg_iters == 5
    # an older checkpoint recorded only the keys it knew: the rest take their defaults
    old = {"kind": "unconditional", "method": "dps-em", "method_config": {"dps": {"scale": 3.0}}}
    assert method_for_checkpoint(old).options["dps"] == type(cfg.dps)(scale=3.0)
    assert method_for_checkpoint({"kind": "conditional"}).name == "diffem"
    assert method_for_checkpoint({"kind": "unconditional", "method": "uncond"}).name == "em-mmps"
    with pytest.raises(DiffemError, match="known"):
        get_method("nope", cfg)
    assert {"diffem", "em-mmps", "naive", "oracle"} <= set(method_names())


def test_prior_methods_drop_vectors_outside_the_box():
    from diffem_cli.methods.base import inside_box

    x = torch.tensor([[0.5, -2.9], [3.5, 0.0], [0.0, -3.01], [2.0, 2.0]])
    assert torch.equal(inside_box(x, 3.0), x[[0, 3]])
    assert torch.equal(inside_box(x, 0.0), x)  # 0 keeps everything
    images = torch.full((2, 1, 2, 2), 9.0)
    assert torch.equal(inside_box(images, 3.0), images)  # images are clipped by the sampler instead


def test_gaussian_covariance_moments_travel_in_the_checkpoint(obs, tmp_path, cli):
    """mmps.covariance=gaussian: the M-step's moments are the training data's, stored as aux
    tensors that reconstruct reads back; the weights alone still build the network."""
    from diffem_cli.diffusion.checkpoint import build_model
    from diffem_cli.io.observations import load_recon

    run_ok(
        "em-train",
        obs / "obs",
        tmp_path / "run",
        "--laps",
        1,
        "--method",
        "em-mmps",
        *TRAIN,
        *sets("mmps.covariance=gaussian", "em.drop_outside=0"),
    )
    ckpt = load_checkpoint(tmp_path / "run/checkpoints/lap_001.safetensors")
    assert ckpt.meta["method_config"]["mmps"]["covariance"] == "gaussian"
    x0, _ = load_recon(tmp_path / "run/recon/lap_000")
    x0 = x0.double()
    # float64 sums of 128 rows of magnitude <~ 10: rounding ~1e-13
    assert torch.allclose(ckpt.aux["moments.mean"], x0.mean(0), atol=1e-10)
    assert torch.allclose(ckpt.aux["moments.cov"], torch.cov(x0.T), atol=1e-10)
    assert not any(k.startswith("aux.") for k in build_model(ckpt).state_dict())
    code, _, err = cli(
        "reconstruct",
        tmp_path / "run/checkpoints/lap_001.safetensors",
        obs / "obs",
        tmp_path / "rec",
        "--steps",
        3,
    )
    assert code == 0, err
    from diffem_cli.methods.em_mmps import moments_from_aux

    assert method_for_checkpoint(ckpt.meta).options["mmps"].covariance == "gaussian"
    moments = moments_from_aux(ckpt.aux)
    assert moments is not None and moments.full


def test_warm_start_sampler_comes_from_the_protocol():
    """Lap 0 of a warm start: the run's own method when its model is of the checkpoint's kind,
    else the checkpoint's method, else the first installed method of that kind that accepts the
    observations."""
    from diffem_channels.jpeg import JpegChannel
    from diffem_channels.mask import MaskChannel
    from diffem_cli.methods.testing import tiny_data
    from diffem_cli.pipeline.em import warm_sampler

    cfg = default_config()
    masked, _ = tiny_data(MaskChannel(rho=0.5), (4,))
    jpeg, _ = tiny_data(JpegChannel(quality=50), (1, 8, 8))
    diffem, mmps = get_method("diffem", cfg), get_method("em-mmps", cfg)
    prior = {"kind": "unconditional", "method": "uncond"}  # a train-uncond checkpoint
    assert warm_sampler(prior, diffem, masked, cfg).name == "em-mmps"
    assert warm_sampler(prior, mmps, masked, cfg) is mmps
    assert warm_sampler({"kind": "conditional", "method": "oracle"}, mmps, masked, cfg).name == "oracle"
    assert warm_sampler({"kind": "unconditional", "method": "dps-em"}, diffem, jpeg, cfg).name == "dps-em"
    # EM-MMPS cannot serve JPEG: another prior method that can samples its model
    chosen = warm_sampler(prior, diffem, jpeg, cfg)
    assert chosen.kind == "unconditional" and chosen.accepts(JpegChannel) is None
    assert warm_sampler({"kind": "ambient", "method": "ambient"}, diffem, masked, cfg).name == "ambient"
    with pytest.raises(DiffemError, match="no installed method can sample"):
        warm_sampler({"kind": "strange"}, diffem, masked, cfg)


def test_compare_method_lists_come_from_the_registry():
    from diffem_cli.pipeline.compare import parse_methods

    assert parse_methods(None) == ["diffem", "em-mmps", "naive", "oracle"]  # compared_by_default
    assert parse_methods("all") == list(method_names())
    assert parse_methods("dps-em, ambient") == ["dps-em", "ambient"]
    with pytest.raises(DiffemError, match=r"unknown method 'difem'; did you mean 'diffem'\?"):
        parse_methods("difem")
    with pytest.raises(DiffemError, match="twice"):
        parse_methods("naive,naive")
