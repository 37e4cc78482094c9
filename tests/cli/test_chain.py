"""The whole CLI chain, corrupt -> em-train -> reconstruct -> train-uncond -> sample -> export, on the
manifold (projection channel) and on digits (mask channel), with tiny networks and budgets."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
from helpers import QUICK, TINY_MLP, TINY_UNET, run_ok, sets
from PIL import Image

from diffem_cli.diffusion.checkpoint import build_model, load_checkpoint
from diffem_cli.io.store import columns, read_dataset, read_manifest


def _chain(root: Path, source: str, channel: list[str], limit: int, net: list[str], batch: int) -> Path:
    run_ok(
        "corrupt",
        source,
        root / "obs",
        "--channel",
        *channel,
        "--clean-out",
        root / "clean",
        "--limit",
        limit,
    )
    train = [*sets(f"train.batch_size={batch}", "train.epochs=2"), *QUICK, *net]
    run_ok("em-train", root / "obs", root / "run", "--laps", 2, *train)
    run_ok(
        "reconstruct",
        root / "run/checkpoints/lap_002.safetensors",
        root / "obs",
        root / "rec",
        "--steps",
        4,
        "--per-observation",
        2,
        *(["--png", root / "rec_png"] if net is TINY_UNET else []),
    )
    run_ok("train-uncond", root / "rec", root / "urun", *train)
    run_ok(
        "sample",
        root / "urun/checkpoints/uncond.safetensors",
        root / "samp",
        "-n",
        24,
        "--steps",
        4,
        *(["--png", root / "samp_png"] if net is TINY_UNET else []),
    )
    run_ok("export", root / "urun/checkpoints/uncond.safetensors", root / "uexp")
    run_ok("export", root / "run/checkpoints/lap_002.safetensors", root / "cexp")
    return root


@pytest.fixture(scope="module")
def manifold(tmp_path_factory) -> Path:
    return _chain(
        tmp_path_factory.mktemp("manifold"), "manifold:samples=256", ["projection"], 256, TINY_MLP, 64
    )


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return _chain(tmp_path_factory.mktemp("digits"), "digits", ["mask", "-p", "rho=0.5"], 64, TINY_UNET, 32)


def _x(folder: Path, n: int, shape: tuple[int, ...]) -> torch.Tensor:
    ds = datasets.load_from_disk(str(folder))
    assert len(ds) == n
    x = columns(ds, ["x"])["x"]
    assert tuple(x.shape) == (n, *shape) and torch.isfinite(x).all()
    return x


def _check_run(root: Path, n: int, shape: tuple[int, ...], cond_size: int, nfe: int = 4) -> None:
    run_dir = root / "run"
    # observations and clean data open with plain datasets
    assert len(datasets.load_from_disk(str(root / "obs"))) == n
    _x(root / "clean", n, shape)
    # every lap's reconstructions, one per observation, in observation order, with its label (digits)
    obs = datasets.load_from_disk(str(root / "obs"))
    carried = [c for c in ("file_name", "label") if c in obs.column_names]
    for lap in range(3):
        ds = datasets.load_from_disk(str(run_dir / "recon" / f"lap_{lap:03d}"))
        assert set(ds.column_names) == {"x", "index", *carried}
        assert all(list(ds[c]) == list(obs[c]) for c in carried)
        assert torch.equal(columns(ds, ["index"])["index"], torch.arange(n))
        _x(run_dir / "recon" / f"lap_{lap:03d}", n, shape)
        assert read_manifest(run_dir / "recon" / f"lap_{lap:03d}")["lap"] == lap
        assert (run_dir / "samples" / f"lap_{lap:03d}.png").stat().st_size > 0
    # checkpoints rebuild the conditional model of the configured size; no training state left over
    for lap in (1, 2):
        ckpt = load_checkpoint(run_dir / "checkpoints" / f"lap_{lap:03d}.safetensors")
        assert ckpt.kind == "conditional" and ckpt.shape == shape and ckpt.meta["lap"] == lap
        assert ckpt.meta["cond_size"] == cond_size and ckpt.meta["channel"]["name"] in ("projection", "mask")
        build_model(ckpt)
    assert not (run_dir / "checkpoints" / "lap_000.safetensors").exists()
    assert not (run_dir / "state" / "mstep.safetensors").exists()
    # metrics: one record per lap, and the M-step's epochs
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    laps = [r for r in records if r["event"] == "lap"]
    assert [r["lap"] for r in laps] == [0, 1, 2]
    assert laps[0]["init"] == "gaussian"
    for r in laps[1:]:
        assert r["mstep_s"] > 0 and r["estep_s"] > 0 and r["nfe"] == nfe and r["loss"] > 0 and r["steps"] > 0
    epochs = [(r["lap"], r["epoch"]) for r in records if r["event"] == "epoch"]
    assert epochs == [(1, 1), (1, 2), (2, 1), (2, 2)]
    config = (run_dir / "config.yaml").read_text()
    assert "epochs: 2" in config and "laps: 2" in config


def _check_uncond(root: Path, shape: tuple[int, ...]) -> None:
    # two posterior samples per observation: x, index and sample-number rows
    n_obs = len(datasets.load_from_disk(str(root / "obs")))
    rec = _x(root / "rec", 2 * n_obs, shape)
    assert not torch.equal(rec[:n_obs], rec[n_obs:])
    assert read_manifest(root / "rec")["per_observation"] == 2
    ckpt = load_checkpoint(root / "urun/checkpoints/uncond.safetensors")
    assert ckpt.kind == "unconditional" and ckpt.shape == shape and ckpt.meta["cond_size"] == 0
    assert (root / "urun/samples/uncond.png").stat().st_size > 0
    assert any(
        json.loads(line)["event"] == "done" for line in (root / "urun/metrics.jsonl").read_text().splitlines()
    )
    _x(root / "samp", 24, shape)
    assert read_manifest(root / "samp")["kind"] == "samples"
    for folder in ("uexp", "cexp"):
        assert (root / folder / "README.md").read_text().startswith("---")
        assert json.loads((root / folder / "diffem.json").read_text())["format"] == "diffem-checkpoint"


def test_manifold_chain(manifold):
    # cond: y, A, A^+ y, A^+ A; the manifold preset corrects every step but the last once: 4 + 3
    _check_run(manifold, 256, (5,), cond_size=2 + 2 * 5 + 5 + 5 * 5, nfe=4 + 3)
    _check_uncond(manifold, (5,))
    # lap 0 is an exact Gaussian posterior sample: it agrees with its measurement y = A x + 0.01 eps
    obs = columns(datasets.load_from_disk(str(manifold / "obs")), ["y", "A"])
    x0 = _x(manifold / "run/recon/lap_000", 256, (5,))
    residual = torch.einsum("bmn,bn->bm", obs["A"], x0) - obs["y"]
    assert residual.abs().mean() < 0.05
    assert {p.name for p in (manifold / "uexp").iterdir()} == {
        "model.safetensors",
        "diffem.json",
        "README.md",
    }


def test_digits_chain(digits):
    _check_run(digits, 64, (1, 8, 8), cond_size=2 + 1)  # y, mask, the Gaussian posterior mean
    _check_uncond(digits, (1, 8, 8))
    pngs = sorted(p.name for p in (digits / "rec_png").iterdir())  # one grid of 64 per draw
    assert pngs == ["000000_000063_draw0.png", "000000_000063_draw1.png"]
    samples = sorted((digits / "samp_png").iterdir())
    assert [p.name for p in samples[:2]] == ["000000.png", "000001.png"] and len(samples) == 24
    with Image.open(samples[0]) as im:
        assert im.size == (8, 8) and im.mode == "L"
    assert (digits / "uexp/model_index.json").exists() and (digits / "uexp/unet/config.json").exists()
    assert (digits / "cexp/unet/config.json").exists() and (digits / "cexp/scheduler").is_dir()
    # no temporary folders left beside the outputs
    assert not [p.name for p in digits.iterdir() if p.name.startswith(".")]


def test_a_run_is_scored_as_a_posterior_on_held_out_digits(digits, tmp_path):
    """The held-out chain: digits the run never saw (``--skip``, their indices kept), drawn twice
    each by its checkpoint and scored as a posterior with the observations."""
    run_ok(
        "corrupt",
        "digits",
        tmp_path / "test",
        "--channel",
        "mask",
        "-p",
        "rho=0.5",
        "--skip",
        64,
        "--limit",
        16,
        "--clean-out",
        tmp_path / "clean",
    )
    ckpt = digits / "run/checkpoints/lap_002.safetensors"
    run_ok("reconstruct", ckpt, tmp_path / "test", tmp_path / "rec", "--steps", 4, "--per-observation", 2)
    index = columns(read_dataset(tmp_path / "rec")[0], ["index"])["index"]
    assert sorted(set(index.tolist())) == list(range(64, 80))
    run_ok(
        "evaluate",
        tmp_path / "rec",
        "--reference",
        tmp_path / "clean",
        "--observations",
        tmp_path / "test",
        "--json",
        tmp_path / "m.json",
    )
    post = json.loads((tmp_path / "m.json").read_text())["posterior"]
    assert post["post_k"] == 2 and post["post_n"] == 16 and 0 <= post["post_coverage"] <= 1
