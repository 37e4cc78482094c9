"""The EM loop on disk: resume after SIGKILL in the M-step, idempotent reruns, refusals, --force, NaN."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from helpers import FAST, QUICK, TINY_MLP, TINY_UNET, error_line, kill_when_written, run_ok, sets, snapshot

from diffem_cli.diffusion.checkpoint import build_model, load_checkpoint, load_tensors
from diffem_cli.io.observations import load_recon

TRAIN = [*TINY_MLP, *sets("train.batch_size=64", "train.epochs=2"), *QUICK]


def _records(run_dir: Path, event: str = "lap") -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """Observations and a finished 2-lap RUN; tests work on copies of the RUN."""
    root = tmp_path_factory.mktemp("em")
    run_ok("corrupt", "manifold:samples=256", root / "obs", "--channel", "projection")
    run_ok("em-train", root / "obs", root / "run", "--laps", 2, *TRAIN)
    return root


@pytest.fixture
def run_copy(base, tmp_path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(base / "run", target)
    return target


def test_rerun_of_finished_run_changes_nothing(base, run_copy, cli):
    before = snapshot(run_copy)
    code, _, err = cli("em-train", base / "obs", run_copy, "--laps", 2, *TRAIN)
    assert code == 0 and "error" not in err and "done" in err
    assert snapshot(run_copy) == before


def test_same_seed_same_run(base, cli, tmp_path):
    code, _, err = cli("em-train", base / "obs", tmp_path / "again", "--laps", 2, *TRAIN)
    assert code == 0, err
    a, b = snapshot(base / "run"), snapshot(tmp_path / "again")
    assert a.keys() == b.keys()
    same = [k for k in a if k.endswith((".safetensors", ".arrow"))]
    assert len(same) == 1 + 2 + 3  # Gaussian prior, two checkpoints, three reconstructions
    for name in same:
        if name.endswith(".arrow"):
            assert a[name][0] == b[name][0], name
        else:  # safetensors headers list metadata in no fixed order: compare the contents
            (ta, ma), (tb, mb) = load_tensors(base / "run" / name), load_tensors(tmp_path / "again" / name)
            # the provenance names each RUN and its time; the steps agree on everything else
            pa, pb = (
                [{k: v for k, v in s.items() if k not in ("run", "created")} for s in m.pop("provenance", [])]
                for m in (ma, mb)
            )
            assert ma == mb and pa == pb and ta.keys() == tb.keys(), name
            assert all(torch.equal(ta[k], tb[k]) for k in ta), name


def test_other_config_is_refused_and_nothing_changes(base, run_copy, cli):
    before = snapshot(run_copy)
    code, _, err = cli("em-train", base / "obs", run_copy, "--laps", 2, *TRAIN, "--set", "train.lr=0.5")
    assert code == 2
    assert "train.lr" in error_line(err) and "--force" in error_line(err)
    assert snapshot(run_copy) == before


def test_bad_arguments_write_nothing(base, cli, tmp_path):
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    cases = [
        ((tmp_path / "r1", "--set", "train.nope=1"), "train.nope"),
        ((tmp_path / "r2", "--set", "train.epochs=many"), "train.epochs"),
        ((tmp_path / "r3", "--laps", -1), "--laps"),
        ((tmp_path / "r4", "--config", tmp_path / "missing.yaml"), "neither a preset"),
        ((tmp_path / "r5", "--device", "tpu"), "device"),
        ((tmp_path / "no" / "r6",), "does not exist"),
        ((stranger,), "not a diffem run"),
    ]
    for extra, match in cases:
        code, _, err = cli("em-train", base / "obs", *extra[:1], *TRAIN, *extra[1:])
        assert code == 2, extra
        assert match in error_line(err), (extra, err)
    code, _, err = cli("em-train", tmp_path / "missing_obs", tmp_path / "r7", *TRAIN)
    assert code == 2 and "does not exist" in error_line(err)
    code, _, err = cli("em-train", base / "run/recon/lap_001", tmp_path / "r8", *TRAIN)
    assert code == 2 and "not an observations folder" in error_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stranger"]
    assert [p.name for p in stranger.iterdir()] == ["notes.txt"]


def test_other_observations_are_refused(base, run_copy, cli, tmp_path):
    run_ok("corrupt", "manifold:samples=256", tmp_path / "obs2", "--channel", "projection", "--seed", 1)
    before = snapshot(run_copy)
    code, _, err = cli("em-train", tmp_path / "obs2", run_copy, "--laps", 2, *TRAIN)
    assert code == 2 and "other observations" in error_line(err)
    assert snapshot(run_copy) == before


def test_more_laps_extend_the_run(base, run_copy, cli):
    before = snapshot(run_copy)
    code, _, err = cli("em-train", base / "obs", run_copy, "--laps", 3, *TRAIN)
    assert code == 0 and "error" not in err
    after = snapshot(run_copy)
    for name in (
        "checkpoints/lap_001.safetensors",
        "checkpoints/lap_002.safetensors",
        "recon/lap_002/data-00000-of-00001.arrow",
    ):
        assert after[name] == before[name]
    assert [r["lap"] for r in _records(run_copy)] == [0, 1, 2, 3]
    assert load_checkpoint(run_copy / "checkpoints/lap_003.safetensors").meta["lap"] == 3


def test_force_starts_over(base, run_copy, cli):
    (run_copy / "stray.txt").write_text("kept")
    code, _, err = cli(
        "em-train", base / "obs", run_copy, "--laps", 1, *TRAIN, "--set", "train.lr=2e-3", "--force"
    )
    assert code == 0 and "error" not in err
    assert [r["lap"] for r in _records(run_copy)] == [0, 1]
    assert not (run_copy / "checkpoints/lap_002.safetensors").exists()
    assert not (run_copy / "recon/lap_002").exists()
    assert "lr: 0.002" in (run_copy / "config.yaml").read_text()


def test_missing_estep_is_redone_from_its_checkpoint(base, run_copy, cli):
    ckpt = (run_copy / "checkpoints/lap_002.safetensors").read_bytes()
    shutil.rmtree(run_copy / "recon/lap_002")
    code, _, err = cli("em-train", base / "obs", run_copy, "--laps", 2, *TRAIN)
    assert code == 0 and "error" not in err
    assert (run_copy / "checkpoints/lap_002.safetensors").read_bytes() == ckpt
    assert (run_copy / "recon/lap_002/diffem.json").exists()
    # the redone E-step draws the same reconstructions (seeded by seed, lap and batch)
    assert (run_copy / "recon/lap_002/data-00000-of-00001.arrow").read_bytes() == (
        base / "run/recon/lap_002/data-00000-of-00001.arrow"
    ).read_bytes()
    assert not [r for r in _records(run_copy, "epoch") if r["lap"] == 2][2:]  # no retraining


def test_a_lost_lap_record_and_picture_are_rewritten_from_disk(base, run_copy, cli):
    """A kill after a lap's reconstructions but before its record: the rerun writes the record
    and picture from what is on disk, without training or sampling again."""
    lines = (run_copy / "metrics.jsonl").read_text().splitlines()
    kept = [ln for ln in lines if not (json.loads(ln)["event"] == "lap" and json.loads(ln)["lap"] == 2)]
    (run_copy / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    (run_copy / "samples/lap_001.png").unlink()
    recon = snapshot(run_copy / "recon")
    ckpts = snapshot(run_copy / "checkpoints")
    code, _, err = cli("em-train", base / "obs", run_copy, "--laps", 2, *TRAIN)
    assert code == 0, err
    assert [r["lap"] for r in _records(run_copy)] == [0, 1, 2]
    assert (run_copy / "samples/lap_001.png").exists() and (run_copy / "samples/lap_002.png").exists()
    assert snapshot(run_copy / "recon") == recon and snapshot(run_copy / "checkpoints") == ckpts
    assert "done: 2 laps" in err.replace("\n", " ")


def test_nan_loss_is_an_error_and_keeps_earlier_laps(base, run_copy, cli):
    # a fresh RUN diverging in lap 1: lap 0 is kept, no lap-1 checkpoint
    fresh = run_copy.parent / "fresh"
    code, _, err = cli("em-train", base / "obs", fresh, "--laps", 1, *TRAIN, "--set", "train.lr=1e30")
    assert code == 2 and "loss became" in error_line(err)
    assert (fresh / "recon/lap_000/diffem.json").exists()
    assert not list((fresh / "checkpoints").iterdir())
    assert not (fresh / "recon/lap_001").exists()
    # a finished RUN whose config is edited to diverge in lap 3: laps 1-2 stay exactly as they were
    config = run_copy / "config.yaml"
    edited = yaml.safe_load(config.read_text())
    edited["train"]["lr"] = 1.0e30
    config.write_text(yaml.safe_dump(edited, sort_keys=False))
    before = snapshot(run_copy)
    code, _, err = cli("em-train", base / "obs", run_copy, "--laps", 3, *TRAIN, "--set", "train.lr=1e30")
    assert code == 2 and "loss became" in error_line(err)
    after = snapshot(run_copy)
    for name, value in before.items():
        if name.startswith(("checkpoints/", "recon/")):
            assert after[name] == value, name
    assert not (run_copy / "checkpoints/lap_003.safetensors").exists()
    assert not (run_copy / "recon/lap_003").exists()


def test_warm_start_keeps_its_network(base, cli, tmp_path):
    run_dir = tmp_path / "warm"
    argv = (
        "em-train",
        base / "obs",
        run_dir,
        "--laps",
        1,
        *TRAIN,
        "--set",
        "network.width=48",
        "--warm-start",
        base / "run/checkpoints/lap_002.safetensors",
    )
    code, _, err = cli(*argv)
    assert code == 0 and "error" not in err
    assert _records(run_dir)[0]["init"] == "warm-start"
    ckpt = load_checkpoint(run_dir / "checkpoints/lap_001.safetensors")
    assert ckpt.meta["network"]["width"] == 32 and "width: 32" in (run_dir / "config.yaml").read_text()
    build_model(ckpt)
    before = snapshot(run_dir)
    assert cli(*argv)[0] == 0
    assert snapshot(run_dir) == before
    # an unconditional prior warm-starts DiffEM too: lap 0 is MMPS posterior sampling with it,
    # lap 1 trains a fresh conditional network (the paper's "DiffEM (warm-started)")
    run_ok("train-uncond", run_dir / "recon/lap_001", tmp_path / "urun", *TRAIN)
    run_ok(
        "em-train",
        base / "obs",
        tmp_path / "warm2",
        "--laps",
        1,
        *TRAIN,
        "--warm-start",
        tmp_path / "urun/checkpoints/uncond.safetensors",
    )
    assert _records(tmp_path / "warm2")[0]["init"] == "warm-start"
    x, _ = load_recon(tmp_path / "warm2/recon/lap_000")
    assert torch.isfinite(x).all() and x.shape == (256, 5)
    assert load_checkpoint(tmp_path / "warm2/checkpoints/lap_001.safetensors").meta["kind"] == "conditional"


def test_resume_after_sigkill_in_mstep(base, tmp_path, cli):
    run_dir = tmp_path / "run"
    args = [
        "em-train",
        str(base / "obs"),
        str(run_dir),
        "--laps",
        "2",
        *TRAIN,
        "--set",
        "train.epochs=30",
        "--set",
        "train.batch_size=16",
    ]
    state = run_dir / "state" / "mstep.safetensors"
    kill_when_written(args, state, tmp_path / "first.log")
    assert not (run_dir / "checkpoints/lap_001.safetensors").exists(), "killed too late: lap 1 had finished"
    _, meta = load_tensors(state)
    saved_epoch = meta["epoch"]
    assert 1 <= saved_epoch < 30 and meta["tag"]["lap"] == 1
    n_before = len((run_dir / "metrics.jsonl").read_text().splitlines())

    # the second run, in-process (one thread: tiny steps, and no competition with other processes)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code, _, err = cli(*args)
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    resumed = [r for r in records[n_before:] if r["event"] == "epoch" and r["lap"] == 1]
    assert [r["epoch"] for r in resumed] == list(range(saved_epoch + 1, 31))
    assert resumed[0]["step"] == (saved_epoch + 1) * (256 // 16)
    assert [r["lap"] for r in records if r["event"] == "lap"] == [0, 1, 2]
    for lap in (1, 2):
        model = build_model(load_checkpoint(run_dir / "checkpoints" / f"lap_{lap:03d}.safetensors"))
        assert model.body[0].in_features == 5 + 16 + (2 + 2 * 5 + 5 + 5 * 5)  # x, t, (y, A, A^+ y, A^+ A)
        assert (run_dir / "recon" / f"lap_{lap:03d}" / "diffem.json").exists()
    assert not state.exists()


def test_the_low_rank_gaussian_start_of_images_has_a_cosine_residual(tmp_path):
    """Lap 0 above ``em.gaussian_full_max_dim``: ``em.gaussian_residual=auto`` saves a prior whose
    residual is diagonal in the cosine basis (its ``basis`` tensor), ``pixel`` one without."""
    from diffem_cli.gaussian.cosine import cosine_basis

    run_ok("corrupt", "digits", tmp_path / "obs", "--channel", "mask", "--limit", 48)
    for residual in ("auto", "pixel"):
        out = tmp_path / residual
        low = sets("em.gaussian_full_max_dim=0", f"em.gaussian_residual={residual}")
        run_ok("em-train", tmp_path / "obs", out, "--laps", 1, *FAST, *TINY_UNET, *low)
        prior, _ = load_tensors(out / "gaussian.safetensors")
        if residual == "auto":
            torch.testing.assert_close(prior["basis"], cosine_basis(8, 8))
        else:
            assert "basis" not in prior


def test_the_full_covariance_start_is_shrunk_as_asked_and_recorded(tmp_path):
    """``em.gaussian_shrinkage``: a fixed amount shrinks the start's full covariance by exactly that
    much toward its stationary target, ``auto`` records the amount cross-validation chose."""
    from diffem_cli.gaussian.shrinkage import GRID, shrinkage_target, shrunk

    run_ok("corrupt", "digits", tmp_path / "obs", "--channel", "mask", "--limit", 48)
    covs, amounts = {}, {}
    for setting in ("off", "0.5", "auto"):
        out = tmp_path / setting
        run_ok(
            "em-train",
            tmp_path / "obs",
            out,
            "--laps",
            1,
            *FAST,
            *TINY_UNET,
            *sets(f"em.gaussian_shrinkage={setting}"),
        )
        covs[setting] = load_tensors(out / "gaussian.safetensors")[0]["cov"]
        amounts[setting] = _records(out)[0]["init_shrinkage"]
    assert amounts["off"] == 0.0 and amounts["0.5"] == 0.5 and amounts["auto"] in GRID
    want = shrunk(covs["off"], shrinkage_target(covs["off"], (1, 8, 8)), 0.5)
    torch.testing.assert_close(covs["0.5"], want)
