"""Experiment tracking: ``--log tensorboard`` writes event files under RUN/logs that read back with
the logged scalars and pictures, changes nothing else, and a missing tracker is one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import FAST, TINY_MLP, error_line, run_ok
from safetensors.torch import load_file

from diffem_cli.core.errors import DiffemError
from diffem_cli.core.tracking import check_trackers, flat_config

EPOCHS = 2
SETTINGS = [*TINY_MLP, *FAST, "--set", f"train.epochs={EPOCHS}", "--device", "cpu"]


def _events(logs: Path) -> dict[str, object]:
    """Every scalar (tag -> [(step, value)]) and image tag of the TensorBoard files below ``logs``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[tuple[int, float]]] = {}
    images: set[str] = set()
    for folder in sorted({p.parent for p in logs.rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
        images |= set(acc.Tags()["images"])
    return {"scalars": scalars, "images": images}


@pytest.fixture(scope="module")
def tracked(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("track")
    run_ok("corrupt", "manifold:samples=64,n=2", root / "obs", "--channel", "projection")
    run_ok("em-train", root / "obs", root / "plain", "--laps", 2, *SETTINGS)
    run_ok("em-train", root / "obs", root / "run", "--laps", 2, *SETTINGS, "--log", "tensorboard")
    return {"root": root, "obs": root / "obs", "run": root / "run", "plain": root / "plain"}


def test_em_train_logs_epochs_laps_and_pictures_to_tensorboard(tracked):
    events = _events(tracked["run"] / "logs")
    scalars = events["scalars"]
    records = [json.loads(line) for line in (tracked["run"] / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["event"] == "epoch"]
    # one step axis, the epochs: epoch e of lap k at (k - 1) * EPOCHS + e
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, 2 * EPOCHS + 1))
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([r["loss"] for r in epochs])
    assert [v for _, v in scalars["train/lr"]] == pytest.approx([r["lr"] for r in epochs])
    laps = {r["lap"]: r for r in records if r["event"] == "lap"}
    assert dict(scalars["lap/loss"]) == pytest.approx({k * EPOCHS: laps[k]["loss"] for k in (1, 2)})
    assert [s for s, _ in scalars["lap/observed_residual"]] == [0, EPOCHS, 2 * EPOCHS]
    assert "samples" in events["images"]


def test_tracking_changes_no_result(tracked):
    for lap in (1, 2):
        name = f"checkpoints/lap_{lap:03d}.safetensors"
        a, b = load_file(tracked["run"] / name), load_file(tracked["plain"] / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tracked["plain"] / "logs").exists()


def test_train_uncond_logs_to_tensorboard(tracked):
    run = tracked["root"] / "uncond"
    run_ok("train-uncond", tracked["run"] / "recon" / "lap_002", run, *SETTINGS, "--log", "tensorboard")
    events = _events(run / "logs")
    assert [s for s, _ in events["scalars"]["train/loss"]] == list(range(1, EPOCHS + 1))
    assert "train/lr" in events["scalars"] and "done/loss" in events["scalars"]
    assert "samples" in events["images"]


def test_quiet_silences_notices_and_the_default_shows_them(tracked, cli):
    args = ("em-train", tracked["obs"], tracked["run"], "--laps", 2, *SETTINGS)
    code, _, err = cli(*args)  # a finished RUN: nothing to do but say so
    assert code == 0 and "done: 2 laps" in err
    code, out, err = cli("-q", *args)
    assert code == 0 and err == "" and out == ""


def test_a_missing_tracker_package_is_one_line(tracked, cli, monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec

    def find_spec(name: str, *args: object):
        return None if name == "wandb" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    code, _, err = cli("em-train", tracked["obs"], tmp_path / "run", *SETTINGS, "--log", "wandb")
    assert code == 2
    assert "needs the wandb package: pip install wandb" in error_line(err)
    assert not (tmp_path / "run").exists()
    with pytest.raises(DiffemError, match="unknown tracker"):
        check_trackers(["tensorbored"])
    assert check_trackers(["tensorboard,tensorboard", "tensorboard"]) == ("tensorboard",)


def test_the_configuration_is_flattened_for_tensorboard():
    flat = flat_config({"train": {"lr": 1e-3, "epochs": 2}, "network": {"blocks": [16, 32]}, "seed": None})
    assert flat == {"train.lr": 1e-3, "train.epochs": 2, "network.blocks": "[16, 32]", "seed": "null"}


def test_compare_logs_each_method_run(tmp_path):
    obs, clean = tmp_path / "obs", tmp_path / "clean"
    run_ok("corrupt", "manifold:samples=64,n=2", obs, "--channel", "projection", "--clean-out", clean)
    out = tmp_path / "cmp"
    run_ok("compare", obs, out, "--methods", "diffem", "--eval-clean", clean, "--laps", 1, "--no-uncond",
           *SETTINGS, "--log-with", "tensorboard")  # fmt: skip
    scalars = _events(out / "diffem" / "logs")["scalars"]
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, EPOCHS + 1))
    assert any(tag.startswith("lap/eval_") for tag in scalars)
