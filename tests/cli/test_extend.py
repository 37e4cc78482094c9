"""Extending an em-train RUN: it keeps its configuration and options; ``--laps 0`` runs the start alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from helpers import QUICK, TINY_MLP, error_line, run_ok, sets

TRAIN = [*TINY_MLP, *sets("train.batch_size=64", "train.epochs=1"), *QUICK]


def _laps(run: Path) -> list[dict]:
    records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [r for r in records if r.get("event") == "lap"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """Vector observations with their clean data and a 1-lap RUN evaluated against them."""
    root = tmp_path_factory.mktemp("extend")
    run_ok("corrupt", "manifold:samples=128", root / "obs", "-c", "projection", "--clean-out", root / "clean")
    run_ok("em-train", root / "obs", root / "run", "--laps", 1, *TRAIN, "--eval-clean", root / "clean")
    return root


@pytest.fixture
def run_copy(base: Path, tmp_path: Path) -> Path:
    shutil.copytree(base / "run", tmp_path / "run")
    return tmp_path / "run"


def test_more_laps_keep_the_configuration_and_the_evaluation(base: Path, run_copy: Path, cli) -> None:
    """``--laps 2`` alone: no --set repeated, no --eval-clean, and lap 2 is trained and evaluated alike."""
    code, _, err = cli("em-train", base / "obs", run_copy, "--laps", 2)
    assert code == 0, err
    laps = _laps(run_copy)
    assert [r["lap"] for r in laps] == [0, 1, 2]
    assert any(k.startswith("eval_") for k in laps[2]) and "eval-clean" in err
    config = yaml.safe_load((run_copy / "config.yaml").read_text())
    assert config["em"]["laps"] == 2 and config["network"]["width"] == 32 and config["train"]["epochs"] == 1


def test_another_preset_is_refused_with_the_way_to_continue(base: Path, run_copy: Path, cli) -> None:
    code, _, err = cli("em-train", base / "obs", run_copy, "--laps", 2, "--config", "manifold")
    assert code == 2
    assert f"--config {run_copy}" in error_line(err)
    assert [r["lap"] for r in _laps(run_copy)] == [0, 1]


def test_train_uncond_resumes_with_its_own_configuration(base: Path, tmp_path: Path, cli) -> None:
    """A finished train-uncond RUN rerun without its --set options is complete, not refused; a
    changed option is refused with the way to continue it."""
    recon, urun = base / "run" / "recon" / "lap_001", tmp_path / "urun"
    run_ok("train-uncond", recon, urun, *TRAIN)
    code, _, err = cli("train-uncond", recon, urun)
    assert code == 0 and "already complete" in err and f"{urun}/config.yaml" in err, err
    code, _, err = cli("train-uncond", recon, urun, "--config", "manifold")
    assert code == 2 and f"--config {urun}" in error_line(err)


def test_laps_zero_computes_the_start_alone(base: Path, tmp_path: Path, cli) -> None:
    run = tmp_path / "start"
    code, _, err = cli("em-train", base / "obs", run, "--laps", 0, *TRAIN)
    assert code == 0, err
    assert [r["lap"] for r in _laps(run)] == [0]
    assert (run / "samples" / "lap_000.png").is_file() and not list((run / "checkpoints").iterdir())
    assert yaml.safe_load((run / "config.yaml").read_text())["em"]["laps"] >= 1  # left as configured


def test_capped_warm_up_is_noticed_once_per_run(base: Path, tmp_path: Path, cli) -> None:
    code, _, err = cli(
        "em-train", base / "obs", tmp_path / "r", "--laps", 2, *TRAIN, *sets("train.warmup=1000")
    )
    assert code == 0, err
    assert err.count("warm-up capped") == 1, err


def test_report_draws_the_clean_data_the_run_remembers(base: Path, run_copy: Path, cli) -> None:
    """Without --clean, report.png still shows the --eval-clean data (a third row of panels)."""
    from PIL import Image

    code, _, err = cli("report", run_copy)
    assert code == 0, err
    with Image.open(run_copy / "report.png") as img:
        rows_of_panels = round(img.size[1] / 250)  # 2.5 in per row of scatter panels at 100 dpi
    assert rows_of_panels == 3  # clean, lap 0 (start), lap 1
    assert (run_copy / "metrics.pdf").read_bytes().startswith(b"%PDF")
