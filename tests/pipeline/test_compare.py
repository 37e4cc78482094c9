"""``diffem compare``: several methods on one data set and budget, resumable, with its outputs."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from helpers import QUICK, TINY_MLP, error_line, run_ok, sets

TRAIN = [*TINY_MLP, *sets("train.batch_size=64", "train.epochs=1"), *QUICK]


def _projections(root, n: int) -> None:
    """``n`` manifold vectors through random projections in ``root/obs``, clean ones in ``root/clean``."""
    run_ok(
        "corrupt",
        f"manifold:samples={n}",
        root / "obs",
        "--channel",
        "projection",
        "--clean-out",
        root / "clean",
    )


def test_compare_runs_every_method_and_resumes(tmp_path, cli):
    _projections(tmp_path, 128)
    argv = [
        "compare",
        tmp_path / "obs",
        tmp_path / "cmp",
        "--methods",
        "diffem,em-mmps,oracle",
        "--eval-clean",
        tmp_path / "clean",
        "--laps",
        1,
        *TRAIN,
    ]
    code, out, err = cli(*argv)
    assert code == 0, err
    summary = json.loads((tmp_path / "cmp/compare.json").read_text())
    assert set(summary["methods"]) == {"diffem", "em-mmps", "oracle"}
    for name, row in summary["methods"].items():
        assert row["seconds"] > 0 and "sinkhorn" in row and "uncond_sinkhorn" in row, name
        assert row["obs_sw2"] > 0 and row["obs_sw2_floor"] > 0, name  # the label-free monitor
        assert [r["lap"] for r in summary["laps"][name]] == [0, 1]
        lap, spent = summary["laps"][name][1], summary["accounting"][name]
        # E-step: 128 observations x the sampler's network evaluations, VJPs only for MMPS's final
        # covariance product (the manifold preset solves CG on a Gaussian covariance)
        assert spent["estep_forwards"] == 128 * lap["nfe"]
        assert spent["estep_vjps"] == (128 * lap["nfe"] if name == "em-mmps" else 0)
        assert spent["mstep_steps"] == lap["steps"] and spent["mstep_examples"] == 64 * lap["steps"]
        assert spent["uncond_forwards"] == 128 * lap["nfe"] and spent["uncond_vjps"] == 0
        conditional = name != "em-mmps"  # its unconditional model is trained by train-uncond
        assert (spent["uncond_examples"] > 0) == conditional and spent["wall_s"] >= row["seconds"]
        assert spent["uncond_examples"] == 64 * spent["uncond_steps"]
        examples = spent["mstep_examples"] + spent["uncond_examples"]
        passes = spent["estep_forwards"] + spent["estep_vjps"] + spent["uncond_forwards"]
        assert spent["network_passes"] == 2 * examples + passes
    for f in ("compare.md", "compare.png", "compare-samples.png"):
        assert (tmp_path / "cmp" / f).stat().st_size > 0
    assert (tmp_path / "cmp/diffem/uncond/checkpoints/uncond.safetensors").exists()
    before = (tmp_path / "cmp/em-mmps/metrics.jsonl").read_text()
    assert cli(*argv)[0] == 0  # a rerun resumes: nothing is trained again
    assert (tmp_path / "cmp/em-mmps/metrics.jsonl").read_text() == before


def test_a_conditional_methods_unconditional_model_gets_all_its_laps_budget(tmp_path, cli):
    """DiffEM's unconditional model trains from scratch for K laps' epochs: as many examples as
    EM-MMPS's prior over its K laps; a compare killed before the samples were kept resumes."""
    _projections(tmp_path, 128)
    argv = ["compare", tmp_path / "obs", tmp_path / "cmp", "--methods", "diffem,em-mmps", "--laps", 2]
    argv += [*TRAIN, *sets("em.drop_outside=0")]  # the prior trains on every reconstruction too
    code, _, err = cli(*argv)
    assert code == 0, err
    summary = json.loads((tmp_path / "cmp/compare.json").read_text())
    diffem, prior = summary["accounting"]["diffem"], summary["accounting"]["em-mmps"]
    one_lap = summary["laps"]["em-mmps"][1]["examples"]
    assert one_lap == 128  # one epoch: two full batches of 64
    assert diffem["uncond_examples"] == 2 * one_lap == prior["mstep_examples"] == diffem["mstep_examples"]
    assert diffem["uncond_steps"] == prior["mstep_steps"] == 4
    assert diffem["uncond_budget_laps"] == 2 and prior["uncond_budget_laps"] == prior["uncond_examples"] == 0
    assert "(in laps: diffem 2)" in (tmp_path / "cmp/compare.md").read_text()
    uncond_log = tmp_path / "cmp/diffem/uncond/metrics.jsonl"
    before = uncond_log.read_text()
    shutil.rmtree(tmp_path / "cmp/diffem/samples-uncond")
    code, _, err = cli(*argv)
    assert code == 0, err  # the unconditional RUN's configuration is the same again
    assert uncond_log.read_text() == before  # nothing trained again
    again = json.loads((tmp_path / "cmp/compare.json").read_text())["accounting"]["diffem"]
    assert again["uncond_examples"] == diffem["uncond_examples"] and again["uncond_budget_laps"] == 2


def test_compare_refuses_unknown_methods_before_training(tmp_path, cli):
    _projections(tmp_path, 64)
    code, _, err = cli(
        "compare",
        tmp_path / "obs",
        tmp_path / "cmp",
        "--methods",
        "diffem,nope",
        "--eval-clean",
        tmp_path / "clean",
        *TRAIN,
    )
    assert code == 2 and "nope" in error_line(err) and not (tmp_path / "cmp").exists()
    code, _, err = cli(
        "compare",
        tmp_path / "obs",
        tmp_path / "cmp",
        "--methods",
        "naive",
        "--eval-clean",
        tmp_path / "clean",
        *TRAIN,
    )
    assert code == 2 and "naive" in error_line(err) and not (tmp_path / "cmp").exists()


@pytest.mark.slow
def test_compare_all_runs_the_methods_that_fit_the_channel(tmp_path, cli):
    _projections(tmp_path, 64)
    code, out, err = cli(
        "compare",
        tmp_path / "obs",
        tmp_path / "cmp",
        "--methods",
        "all",
        "--eval-clean",
        tmp_path / "clean",
        "--laps",
        1,
        "--no-uncond",
        *TRAIN,
    )
    assert code == 0, err
    summary = json.loads((tmp_path / "cmp/compare.json").read_text())
    # projections: no observation of the data's shape (naive), no mask (ambient), no noise channel
    assert set(summary["methods"]) == {"diffem", "em-mmps", "oracle", "dps-em"}
    for skipped in ("naive", "ambient", "ambient-tweedie"):
        assert f"skipping {skipped}" in out + err


def test_compare_seeds_give_means_and_student_intervals(tmp_path, cli):
    _projections(tmp_path, 64)
    argv = ["compare", tmp_path / "obs", tmp_path / "cmp", "--methods", "diffem", "--eval-clean"]
    code, _, err = cli(*argv, tmp_path / "clean", "--laps", 1, "--seeds", 2, "--no-uncond", *TRAIN)
    assert code == 0, err
    summary = json.loads((tmp_path / "cmp/compare.json").read_text())
    assert summary["seeds"] == [0, 1] and (tmp_path / "cmp/diffem-seed1/metrics.jsonl").exists()
    runs = summary["runs"]["diffem"]
    a, b = (r["metrics"]["sinkhorn"] for r in runs)
    assert a != b  # the seeds draw different runs
    # two values: s = |a - b| / sqrt(2), half-width t(0.975, 1) s / sqrt(2), t(0.975, 1) = tan(0.475 pi)
    interval = summary["intervals"]["diffem"]["sinkhorn"]
    assert interval["mean"] == pytest.approx((a + b) / 2, rel=1e-12)
    assert interval["half_width"] == pytest.approx(math.tan(0.475 * math.pi) * abs(a - b) / 2, rel=1e-9)
    assert summary["methods"]["diffem"]["sinkhorn"] == interval["mean"]
    table = (tmp_path / "cmp/compare.md").read_text()
    assert "±" in table and "over 2 seeds (0, 1)" in table
    assert (tmp_path / "cmp/compare.png").stat().st_size > 0
    code, _, err = cli(*argv, tmp_path / "clean", "--seeds", 0, *TRAIN)
    assert code == 2 and "--seeds" in error_line(err)


def test_compare_without_clean_data_scores_label_free(tmp_path, cli):
    _projections(tmp_path, 64)
    argv = ["compare", tmp_path / "obs", tmp_path / "cmp", "--laps", 1, *TRAIN]
    code, _, err = cli(*argv, "--methods", "diffem,oracle")
    assert code == 2 and "oracle" in error_line(err) and "--eval-clean" in error_line(err)
    assert not (tmp_path / "cmp").exists()  # refused before anything trains or is written
    code, _, err = cli(*argv, "--methods", "diffem,em-mmps")
    assert code == 0, err
    summary = json.loads((tmp_path / "cmp/compare.json").read_text())
    assert summary["clean"] is None
    for name, row in summary["methods"].items():
        assert "sinkhorn" not in row and "uncond_sinkhorn" not in row, name  # nothing needs clean data
        assert row["obs_sw2"] > 0 and row["obs_sw2_floor"] > 0, name
        # the unconditional model's samples, corrupted like the observations: as many as observations
        assert row["uncond_obs_sw2"] > 0 and summary["accounting"][name]["uncond_forwards"] % 64 == 0, name
    for f in ("compare.md", "compare.png", "compare-samples.png"):
        assert (tmp_path / "cmp" / f).stat().st_size > 0


def test_uncond_monitor_tells_the_data_distribution_from_a_wrong_one(tmp_path):
    import torch

    from diffem_cli.io.observations import Observations, load_clean
    from diffem_cli.methods import load_config
    from diffem_cli.pipeline.compare import uncond_monitor
    from diffem_cli.pipeline.monitor import monitor_record

    _projections(tmp_path, 512)
    data, cfg = Observations(tmp_path / "obs"), load_config("manifold", [])
    clean = load_clean(tmp_path / "clean", data)
    exact = uncond_monitor(
        data, clean[torch.randperm(len(clean), generator=torch.Generator().manual_seed(0))], cfg
    )
    floor = monitor_record(data, clean, cfg.seed, 0, cfg.eval.n_points)["obs_sw2_floor"]
    wrong = uncond_monitor(data, 0.5 * clean, cfg)
    # samples from the data distribution itself sit at the floor's scale (both compare two sets of
    # 256 observations); shrinking the data by half is far above it
    assert exact["uncond_obs_sw2"] < 2 * floor < wrong["uncond_obs_sw2"]
    assert uncond_monitor(data, clean[:10], cfg) == {}


def test_match_compute_gives_every_method_the_same_estep_passes(tmp_path, cli):
    _projections(tmp_path, 64)
    argv = ["compare", tmp_path / "obs", tmp_path / "cmp", "--methods", "diffem,em-mmps", "--laps", 1]
    argv += ["--eval-clean", tmp_path / "clean", "--no-uncond", *TRAIN]
    code, _, err = cli(*argv, "--match", "compute")
    assert code == 0, err
    summary = json.loads((tmp_path / "cmp/compare.json").read_text())
    # the manifold preset's MMPS solves on the Gaussian covariance: a forward and one VJP per
    # evaluation. DiffEM's 4 steps with one correction after each but the last are 7 evaluations;
    # MMPS's 2 steps are 3 evaluations of 2 passes (6), its 3 steps 5 of 2 (10): 2 is nearest to 7
    assert summary["match"] == "compute" and summary["sample_steps"] == {"diffem": 4, "em-mmps": 2}
    spent = summary["accounting"]
    diffem_passes = spent["diffem"]["estep_forwards"] + spent["diffem"]["estep_vjps"]
    mmps_passes = spent["em-mmps"]["estep_forwards"] + spent["em-mmps"]["estep_vjps"]
    assert (diffem_passes, mmps_passes) == (64 * 7, 64 * 6)
    assert "--match compute" in (tmp_path / "cmp/compare.md").read_text()
    code, _, err = cli(*argv, "--match", "flops")
    assert code == 2 and "--match" in error_line(err)


def test_passes_per_step_follow_each_guidance():
    from diffem_cli.io.registry import make_channel
    from diffem_cli.methods import get_method, load_config

    projection, jpeg = make_channel("projection", {}), make_channel("jpeg", {})
    tweedie = load_config("digits", ["mmps.cg_iters=3", "mmps.covariance=tweedie"])
    gaussian = load_config("digits", ["mmps.covariance=gaussian"])
    assert get_method("diffem", tweedie).passes_per_step(projection) == 1
    assert get_method("em-mmps", tweedie).passes_per_step(projection) == 5  # forward, 3 CG VJPs, final VJP
    assert get_method("em-mmps", gaussian).passes_per_step(projection) == 2
    assert get_method("dps-em", tweedie).passes_per_step(projection) == 2
    assert get_method("naive", tweedie).passes_per_step(jpeg) == 2  # DPS for a non-linear channel
