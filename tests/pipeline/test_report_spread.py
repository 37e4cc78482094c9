"""The posterior-spread row: the last lap keeps the per-pixel standard deviation of its
posterior-quality samples (a small safetensors file beside its picture), and ``report.png`` draws
it under the reconstructions; without that file the row is left out."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import FAST, TINY_UNET, run_ok, sets
from PIL import Image

from diffem_cli.diffusion.checkpoint import load_tensors
from diffem_cli.io.observations import Observations
from diffem_cli.pipeline.report import spread_file, spread_rows


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("spread")
    run_ok(
        "corrupt",
        "digits",
        root / "obs",
        "-c",
        "mask",
        "-p",
        "rho=0.5",
        "--limit",
        24,
        "--clean-out",
        root / "clean",
    )
    posterior = sets("eval.posterior_n=6", "eval.posterior_k=3")
    run_ok(
        "em-train",
        root / "obs",
        root / "run",
        "--laps",
        1,
        *FAST,
        *TINY_UNET,
        *posterior,
        "--eval-clean",
        root / "clean",
    )
    return root


def test_the_last_lap_keeps_its_posterior_spread(run: Path) -> None:
    path = spread_file(run / "run", 1)
    assert path == run / "run/samples/lap_001.spread.safetensors"
    tensors, meta = load_tensors(path, require_checksum=True)
    assert meta["k"] == 3 and tensors["std"].shape == (6, 1, 8, 8)
    assert torch.equal(tensors["index"], torch.arange(6))
    # observed pixels are kept exactly (noiseless mask): the K samples agree there, and only there
    held = Observations(run / "obs").obs["mask"][:6]
    std = tensors["std"]
    assert float(std[held == 1].abs().max()) < 1e-6 and float(std[held == 0].mean()) > 0
    assert list(spread_rows({"diffem": (run / "run", 1), "lost": (run / "run", 7)})) == [
        "diffem posterior spread (K=3)"
    ]


def test_report_draws_the_spread_row_when_kept(run: Path, cli, tmp_path: Path) -> None:
    import shutil

    shutil.copytree(run / "run", tmp_path / "run")
    code, _, err = cli("report", tmp_path / "run", "--clean", run / "clean")
    assert code == 0, err
    with Image.open(tmp_path / "run/report.png") as img:
        with_spread = img.size
    spread_file(tmp_path / "run", 1).unlink()  # a RUN that kept none: the row is left out
    code, _, err = cli("report", tmp_path / "run", "--clean", run / "clean")
    assert code == 0, err
    with Image.open(tmp_path / "run/report.png") as img:
        without = img.size
    assert with_spread[1] >= without[1] + 64 + 40  # one row of tiles and the colour bar
