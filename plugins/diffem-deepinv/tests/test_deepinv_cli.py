"""Tiny end-to-end chains through diffem's CLI on deepinv channels: corrupt, em-train (DiffEM,
EM-MMPS, DPS-EM; Noise2Self, SURE-Score, Ambient-Tweedie on dinv-denoising), reconstruct, sample
and compare, on scikit-learn's 8x8 digits with tiny networks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("deepinv")

import torch  # noqa: E402
from dinv_helpers import TRAIN, read_columns, read_x, run_ok  # noqa: E402

from diffem_cli.diffusion.checkpoint import load_checkpoint  # noqa: E402
from diffem_cli.io.store import read_manifest  # noqa: E402

N = 64


def _laps(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == "lap"]


def _check_lap(run_dir: Path, channel: str, method: str) -> None:
    laps = _laps(run_dir)
    assert [r["lap"] for r in laps] == [0, 1]
    assert laps[0]["init"] == "gaussian"  # the Gaussian start needs A, A^T and the noise level
    ckpt = load_checkpoint(run_dir / "checkpoints/lap_001.safetensors")
    assert ckpt.meta["channel"]["name"] == channel and ckpt.meta["method"] == method
    x = read_x(run_dir / "recon/lap_001")
    assert x.shape == (N, 1, 8, 8) and torch.isfinite(x).all()


@pytest.fixture(scope="module")
def inpainting(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inpainting")
    run_ok(
        "corrupt",
        "digits",
        root / "obs",
        "-c",
        "dinv-inpainting",
        "-p",
        "mask=0.5",
        "-p",
        "noise_sigma=0.05",
        "--limit",
        N,
        "--clean-out",
        root / "clean",
    )
    return root


def test_corrupt_writes_deepinv_observations(inpainting: Path) -> None:
    cols = read_columns(inpainting / "obs")
    assert {"y", "mask", "index"} <= set(cols) and cols["y"].shape == (N, 1, 8, 8)
    manifest = read_manifest(inpainting / "obs")
    assert manifest["channel"] == {
        "name": "dinv-inpainting",
        "api_version": 2,
        "params": {"mask": 0.5, "pixelwise": True, "noise_sigma": 0.05},
    }
    assert abs(cols["mask"].mean().item() - 0.5) < 0.05
    assert (cols["y"][cols["mask"] == 0] == 0).all()


def _train_one_lap_and_reconstruct(tmp_path: Path, channel: str, method: str) -> None:
    """One lap of ``method`` on ``tmp_path/obs``, then ``reconstruct`` with its checkpoint."""
    run_ok(
        "em-train",
        tmp_path / "obs",
        tmp_path / "run",
        "--config",
        "digits",
        "--laps",
        1,
        "--method",
        method,
        *TRAIN,
    )
    _check_lap(tmp_path / "run", channel, method)
    ckpt = tmp_path / "run/checkpoints/lap_001.safetensors"
    run_ok("reconstruct", ckpt, tmp_path / "obs", tmp_path / "rec", "--steps", 4)
    assert read_x(tmp_path / "rec").shape == (N, 1, 8, 8)


@pytest.mark.parametrize("method", ["diffem", "em-mmps", "dps-em"])
def test_em_train_on_inpainting(inpainting: Path, tmp_path: Path, method: str) -> None:
    run_dir = tmp_path / "run"
    run_ok(
        "em-train", inpainting / "obs", run_dir, "--config", "digits", "--laps", 1, "--method", method, *TRAIN
    )
    _check_lap(run_dir, "dinv-inpainting", method)


def test_blur_with_dps_em_and_reconstruct(tmp_path: Path) -> None:
    run_ok(
        "corrupt",
        "digits",
        tmp_path / "obs",
        "-c",
        "dinv-blur",
        "-p",
        "sigma=0.8",
        "-p",
        "noise_sigma=0.05",
        "--limit",
        N,
    )
    _train_one_lap_and_reconstruct(tmp_path, "dinv-blur", "dps-em")


def test_compressed_sensing_with_em_mmps_and_reconstruct(tmp_path: Path) -> None:
    """Each command rebuilds the channel from its spec in a fresh object: the adjoint of the
    compressed-sensing matrix must find the image shape (8x8) all the same."""
    run_ok(
        "corrupt",
        "digits",
        tmp_path / "obs",
        "-c",
        "dinv-cs",
        "-p",
        "m=32",
        "-p",
        "noise_sigma=0.05",
        "--limit",
        N,
    )
    assert read_columns(tmp_path / "obs")["y"].shape == (N, 32)
    _train_one_lap_and_reconstruct(tmp_path, "dinv-cs", "em-mmps")


def test_denoising_with_diffem(tmp_path: Path) -> None:
    run_ok(
        "corrupt", "digits", tmp_path / "obs", "-c", "dinv-denoising", "-p", "noise_sigma=0.2", "--limit", N
    )
    run_ok("em-train", tmp_path / "obs", tmp_path / "run", "--config", "digits", "--laps", 1, *TRAIN)
    _check_lap(tmp_path / "run", "dinv-denoising", "diffem")


@pytest.fixture(scope="module")
def denoising(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("denoising")
    run_ok("corrupt", "digits", root / "obs", "-c", "dinv-denoising", "-p", "noise_sigma=0.2", "--limit", N)
    return root


@pytest.mark.parametrize("method", ["noise2self", "sure-score", "ambient-tweedie"])
def test_denoiser_methods_serve_dinv_denoising(denoising: Path, tmp_path: Path, method: str) -> None:
    """The channel declares gaussian_denoising: the methods read its level from noise_std, not
    from a parameter called sigma (it has noise_sigma)."""
    run_ok(
        "em-train",
        denoising / "obs",
        tmp_path / "run",
        "--config",
        "digits",
        "--laps",
        1,
        "--method",
        method,
        *TRAIN,
    )
    ckpt_path = tmp_path / "run/checkpoints/lap_001.safetensors"
    ckpt = load_checkpoint(ckpt_path)
    assert ckpt.meta["channel"]["name"] == "dinv-denoising" and ckpt.meta["method"] == method
    assert [r["lap"] for r in _laps(tmp_path / "run")] == [0, 1]
    run_ok("reconstruct", ckpt_path, denoising / "obs", tmp_path / "rec", "--steps", 4)
    x = read_x(tmp_path / "rec")
    assert x.shape == (N, 1, 8, 8) and torch.isfinite(x).all()
    if method == "ambient-tweedie":  # a prior: it samples from the level its checkpoint records
        assert ckpt.meta["ambient_tweedie"]["noise_std"] == pytest.approx(0.2)
        run_ok("sample", ckpt_path, tmp_path / "s", "-n", 3, "--steps", 4)
        assert read_x(tmp_path / "s").shape == (3, 1, 8, 8)


def test_compare_on_downsampling(tmp_path: Path) -> None:
    run_ok(
        "corrupt",
        "digits",
        tmp_path / "obs",
        "-c",
        "dinv-downsampling",
        "-p",
        "factor=2",
        "-p",
        "noise_sigma=0.02",
        "--limit",
        N,
        "--clean-out",
        tmp_path / "clean",
    )
    assert read_columns(tmp_path / "obs")["y"].shape == (N, 1, 4, 4)
    run_ok(
        "compare",
        tmp_path / "obs",
        tmp_path / "cmp",
        "--config",
        "digits",
        "--methods",
        "diffem,em-mmps,dps-em",
        "--laps",
        1,
        "--eval-clean",
        tmp_path / "clean",
        *TRAIN,
    )
    summary = json.loads((tmp_path / "cmp/compare.json").read_text())
    assert set(summary["methods"]) == {"diffem", "em-mmps", "dps-em"}
    for name, row in summary["methods"].items():
        assert row["seconds"] > 0 and row["psnr"] > 0, name


def test_compare_the_other_methods_on_noiseless_inpainting(tmp_path: Path) -> None:
    """Ambient-Diffusion needs noiseless masked observations, which dinv-inpainting declares."""
    run_ok(
        "corrupt",
        "digits",
        tmp_path / "obs",
        "-c",
        "dinv-inpainting",
        "--limit",
        N,
        "--clean-out",
        tmp_path / "clean",
    )
    methods = "ambient,naive,oracle"
    run_ok(
        "compare",
        tmp_path / "obs",
        tmp_path / "cmp",
        "--config",
        "digits",
        "--methods",
        methods,
        "--laps",
        1,
        "--eval-clean",
        tmp_path / "clean",
        *TRAIN,
    )
    summary = json.loads((tmp_path / "cmp/compare.json").read_text())
    assert set(summary["methods"]) == set(methods.split(","))
