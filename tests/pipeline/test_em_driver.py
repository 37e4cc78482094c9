"""The lap driver itself, in memory, with a fake method that records every call: laps in order,
a finished RUN left alone, a lost E-step redone from its checkpoint, a lost lap record rewritten
from disk, more laps appended, all without asking the method for work it already did."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from diffem_cli.diffusion.denoise import Denoiser
from diffem_cli.diffusion.losses import VLoss
from diffem_cli.io.registry import make_channel
from diffem_cli.io.sources import load_source
from diffem_cli.methods import default_config
from diffem_cli.methods.base import Method, MStep, Posterior
from diffem_cli.pipeline import em
from diffem_cli.pipeline.corrupt import corrupt_dataset


class Shrink(Denoiser):
    """x0 = x_t / 2: cheap and deterministic."""

    def __call__(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        return x_t * 0.5


class Fake(Method):
    name = "fake"
    description = "a fake method that records the driver's calls"
    calls: list[tuple[str, int]] = []

    def mstep(self, data, prev, lap, laps, clean, cfg) -> MStep:
        Fake.calls.append(("mstep", lap))
        return MStep({"x": prev}, VLoss())

    def posterior(self, model, data, aux) -> Posterior:
        Fake.calls.append(("posterior", len(data)))
        return Posterior(lambda obs: Shrink(), record={"fake": 1})


@pytest.fixture
def driver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setattr(em, "get_method", lambda name, cfg: Fake.from_config(cfg))
    Fake.calls.clear()
    channel = make_channel("projection", {})
    corrupt_dataset(load_source("manifold:samples=64"), channel, tmp_path / "obs", seed=0, progress=False)
    cfg = default_config()
    cfg.network = {"type": "mlp", "width": 8, "depth": 1, "emb_dim": 4}
    cfg.train.epochs, cfg.train.batch_size, cfg.train.warmup = 1, 32, 0
    cfg.sample.steps, cfg.em.gaussian_iters = 2, 1

    def run(laps: int) -> list[dict[str, Any]]:
        return em.em_train(tmp_path / "obs", tmp_path / "run", cfg, laps=laps, log=lambda _: None)

    return {"run": run, "root": tmp_path / "run"}


def test_laps_run_in_order_and_a_finished_run_asks_for_nothing(driver):
    records = driver["run"](2)
    assert [r["lap"] for r in records] == [0, 1, 2]
    assert Fake.calls == [("mstep", 1), ("posterior", 64), ("mstep", 2), ("posterior", 64)]
    assert records[1]["nfe"] == 2 and "loss" in records[1]
    Fake.calls.clear()
    assert [r["lap"] for r in driver["run"](2)] == [0, 1, 2]
    assert Fake.calls == []


def test_a_lost_estep_is_redone_and_a_lost_record_rewritten(driver):
    driver["run"](2)
    shutil.rmtree(driver["root"] / "recon" / "lap_002")
    log = driver["root"] / "metrics.jsonl"
    kept = [r for r in map(json.loads, log.read_text().splitlines()) if (r["event"], r["lap"]) != ("lap", 1)]
    log.write_text("".join(json.dumps(r) + "\n" for r in kept))
    Fake.calls.clear()
    records = driver["run"](2)
    assert Fake.calls == [("posterior", 64)]  # lap 2's E-step from its checkpoint; lap 1 from disk
    assert [r["lap"] for r in records] == [0, 1, 2] and records[1]["loss"] > 0
    laps = [r["lap"] for r in map(json.loads, log.read_text().splitlines()) if r["event"] == "lap"]
    assert laps.count(1) == 1 and set(laps) == {0, 1, 2}  # the lost record is back, once (the log is
    # append-only: lap 2's redone E-step adds a newer lap-2 record, which readers take)


def test_more_laps_continue_where_the_run_stopped(driver):
    driver["run"](1)
    Fake.calls.clear()
    assert [r["lap"] for r in driver["run"](3)] == [0, 1, 2, 3]
    assert Fake.calls == [("mstep", 2), ("posterior", 64), ("mstep", 3), ("posterior", 64)]
