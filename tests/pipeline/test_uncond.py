"""``train-uncond`` and ``sample``: checkpoints, reruns, seeds, and one-line refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import pytest
import torch
from helpers import QUICK, TINY_MLP, error_line, kill_when_written, run_ok, sets, snapshot

from diffem_cli.diffusion.checkpoint import load_checkpoint
from diffem_cli.io.store import columns, read_manifest

TRAIN = [*TINY_MLP, *sets("train.epochs=2", "train.batch_size=32"), *QUICK]


@pytest.fixture(scope="module")
def d(tmp_path_factory) -> Path:
    """Manifold observations + clean points, a 1-lap conditional RUN, and an unconditional RUN."""
    root = tmp_path_factory.mktemp("uncond")
    run_ok(
        "corrupt",
        "manifold:samples=128",
        root / "obs",
        "--channel",
        "projection",
        "--clean-out",
        root / "clean",
    )
    run_ok("em-train", root / "obs", root / "run", "--laps", 1, *TRAIN)
    run_ok("train-uncond", root / "run/recon/lap_001", root / "urun", *TRAIN)
    return root


def test_train_uncond_outputs(d):
    ckpt = load_checkpoint(d / "urun/checkpoints/uncond.safetensors")
    assert ckpt.kind == "unconditional" and ckpt.shape == (5,) and ckpt.meta["cond_size"] == 0
    assert ckpt.meta["network"]["width"] == 32 and ckpt.meta["laps"] == 1
    records = [json.loads(line) for line in (d / "urun/metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["event"] == "epoch"] == [1, 2]
    done = [r for r in records if r["event"] == "done"]
    assert len(done) == 1 and done[0]["steps"] == 2 * (128 // 32)
    assert (d / "urun/samples/uncond.png").stat().st_size > 0
    assert not (d / "urun/state/mstep.safetensors").exists()
    assert "epochs: 2" in (d / "urun/config.yaml").read_text()


def test_sample_seeds_and_shapes(d, cli, tmp_path):
    ckpt = d / "urun/checkpoints/uncond.safetensors"

    def draw(name: str, *extra: object) -> torch.Tensor:
        code, _, err = cli("sample", ckpt, tmp_path / name, "-n", 50, "--steps", 4, *extra)
        assert code == 0 and "error" not in err
        ds = datasets.load_from_disk(str(tmp_path / name))
        assert ds.column_names == ["x"] and len(ds) == 50
        return columns(ds, ["x"])["x"]

    a, b, c = draw("a"), draw("b"), draw("c", "--seed", 1)
    assert a.shape == (50, 5) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert a.std(0).min() > 0  # distinct samples, not one point repeated
    ddim = draw("ddim", "--sampler", "ddim", "--batch-size", 7)
    assert ddim.shape == (50, 5)
    manifest = read_manifest(tmp_path / "ddim")
    assert manifest["kind"] == "samples" and manifest["sampler"] == "ddim" and manifest["data_shape"] == [5]


def test_rerun_finished_does_nothing_and_other_config_is_refused(d, cli, tmp_path):
    urun = tmp_path / "urun"
    shutil.copytree(d / "urun", urun)
    before = snapshot(urun)
    code, _, err = cli("train-uncond", d / "run/recon/lap_001", urun, *TRAIN)
    assert code == 0 and "already complete" in err
    assert snapshot(urun) == before
    code, _, err = cli("train-uncond", d / "run/recon/lap_001", urun, *TRAIN, "--set", "train.lr=0.01")
    assert code == 2 and "train.lr" in error_line(err)
    code, _, err = cli("train-uncond", d / "run/recon/lap_000", urun, *TRAIN)
    assert code == 2 and "other reconstructions" in error_line(err)
    assert snapshot(urun) == before
    # --force starts over with the new config, removing only what diffem wrote
    (urun / "notes.txt").write_text("mine")
    code, _, err = cli("train-uncond", d / "clean", urun, *TRAIN, "--set", "train.epochs=1", "--force")
    assert code == 0 and "error" not in err
    records = [json.loads(line) for line in (urun / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["event"] == "epoch"] == [1]
    assert (urun / "notes.txt").read_text() == "mine"
    assert load_checkpoint(urun / "checkpoints/uncond.safetensors").meta["trained_on"] == str(d / "clean")


def test_sample_bad_input(d, cli, tmp_path):
    ckpt = d / "urun/checkpoints/uncond.safetensors"
    out = tmp_path / "out"
    cases = [
        (("sample", d / "run/checkpoints/lap_001.safetensors", out), "conditional model"),
        (("sample", tmp_path / "missing.safetensors", out), "does not exist"),
        (("sample", ckpt, out, "-n", 0), "-n must be >= 1"),
        (("sample", ckpt, out, "--steps", 0), "--steps"),
        (("sample", ckpt, out, "--sampler", "heun"), "--sampler must be one of"),
        (("sample", ckpt, tmp_path / "no" / "out"), "does not exist"),
        (("sample", ckpt, out, "--png", tmp_path / "png"), "image"),
        (("train-uncond", d / "obs", tmp_path / "u2", *TRAIN), "column 'x'"),
        (("train-uncond", d / "clean", tmp_path / "u3", *TRAIN, "--set", "train.nope=1"), "train.nope"),
        (("train-uncond", tmp_path / "missing", tmp_path / "u4"), "does not exist"),
    ]
    for argv, match in cases:
        code, _, err = cli(*argv)
        assert code == 2, argv
        assert match in error_line(err), (argv, err)
        assert not out.exists() and not (tmp_path / "png").exists()
        assert not (tmp_path / "u2").exists() and not (tmp_path / "u3").exists()
    # an existing OUT is left alone without --force; with it, replaced only if diffem wrote it
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = cli("sample", ckpt, out, "-n", 4, "--steps", 2)
    assert code == 2 and "already exists" in error_line(err)
    code, _, err = cli("sample", ckpt, out, "-n", 4, "--steps", 2, "--force")
    assert code == 2 and "diffem did not write (keep.txt)" in error_line(err)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()
    assert cli("sample", ckpt, out, "-n", 2, "--steps", 2, "--force")[0] == 0
    assert cli("sample", ckpt, out, "-n", 4, "--steps", 2, "--force")[0] == 0
    assert len(datasets.load_from_disk(str(out))) == 4


def test_a_killed_train_uncond_resumes_its_epochs(d, cli, tmp_path: Path) -> None:
    """A kill mid-training leaves only a training state (no lap record, no checkpoint): the rerun
    goes on from the state's epoch instead of wiping the RUN."""
    from diffem_cli.diffusion.checkpoint import load_tensors

    run_dir, log = tmp_path / "urun", tmp_path / "first.log"
    args = ["train-uncond", str(d / "run/recon/lap_001"), str(run_dir), *map(str, TRAIN)]
    args += ["--set", "train.epochs=40", "--set", "train.batch_size=8"]
    state = run_dir / "state" / "mstep.safetensors"
    kill_when_written(args, state, log)
    assert not (run_dir / "checkpoints/uncond.safetensors").exists(), "killed too late: training had finished"
    saved = int(load_tensors(state)[1]["epoch"])
    before = (run_dir / "metrics.jsonl").read_text()  # its timings differ from any rerun's
    code, _, err = cli(*args)
    assert code == 0, err
    after = (run_dir / "metrics.jsonl").read_text()
    assert after.startswith(before), "the first run's records were lost: the RUN was wiped"
    records = [json.loads(line) for line in after.splitlines()]
    epochs = [r["epoch"] for r in records if r["event"] == "epoch"]
    assert epochs == list(range(1, 41)) and saved >= 1
    assert not state.exists()
