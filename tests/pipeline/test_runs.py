"""RUN folders trusted only as far as they verify: broken laps found and redone, records appended
whole, an epoch record a kill lost taken back from the training state, foreign folders refused."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from helpers import QUICK, TINY_MLP, error_line, run_ok, sets

from diffem_cli.config.run import RunConfig, _apply, parse_sets
from diffem_cli.core.errors import DiffemError
from diffem_cli.diffusion.checkpoint import save_checkpoint, save_tensors
from diffem_cli.diffusion.nets import build_network
from diffem_cli.io.observations import save_recon
from diffem_cli.methods import default_config
from diffem_cli.pipeline.runs import Run

MLP = {"type": "mlp", "width": 8, "depth": 1, "emb_dim": 4}
INFO = {"data": "obs", "fingerprint": "f" * 16}
WHY = "(its data or diffem.json were modified or corrupted)"


def _cfg() -> RunConfig:
    cfg = default_config()
    cfg.network = dict(MLP)
    return cfg


def _flip(path: Path, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    for i in range(n):
        data[len(data) // 2 + i] ^= 0xFF
    path.write_bytes(data)


def _run(root: Path, laps: int = 2, rows: int = 8) -> Run:
    """A RUN holding ``laps`` finished laps of a tiny vector model, no training involved."""
    run = Run(root)
    run.prepare(_cfg(), INFO, force=False)
    meta = {"kind": "conditional", "network": MLP, "cond_size": 2, "data": {"shape": [2], "kind": "vector"}}
    for lap in range(laps + 1):
        if lap:
            save_checkpoint(run.checkpoint(lap), build_network(MLP, (2,), 2), {**meta, "lap": lap})
        save_recon(run.recon(lap), torch.randn(rows, 2), torch.arange(rows), {"lap": lap, "data_shape": [2]})
        run.log({"event": "lap", "lap": lap})
    return run


def test_a_finished_run_verifies(tmp_path: Path) -> None:
    run = _run(tmp_path / "run")
    assert all(run.broken(lap, 8, missing=True) == [] for lap in range(3))
    run.verify_laps()
    assert run.redo_broken(8, print) == []


def test_a_truncated_checkpoint_and_flipped_reconstructions_are_found_and_redone(tmp_path: Path) -> None:
    run = _run(tmp_path / "run", rows=512)  # flipped bytes in the middle land in the rows
    ckpt = run.checkpoint(2)
    ckpt.write_bytes(ckpt.read_bytes()[:300])
    _flip(next(run.recon(1).glob("*.arrow")), 16)
    [(path, why)] = run.broken(2)
    assert path == ckpt and "truncated or corrupt" in why
    assert run.broken(1) == [(run.recon(1), f"{run.recon(1)}: checksum mismatch {WHY}")]
    with pytest.raises(DiffemError) as err:
        run.verify_laps()
    message = str(err.value)
    assert message.endswith(f"; rerun em-train on {run.root} to redo lap 1") and "\n" not in message
    lines: list[str] = []
    assert run.redo_broken(512, lines.append) == [1, 2]
    assert len(lines) == 2 and all(line.endswith("; redoing it") for line in lines)
    # only the broken files went: lap 1's checkpoint and lap 2's reconstructions are kept
    assert not ckpt.exists() and not run.recon(1).exists()
    assert run.checkpoint(1).exists() and run.recon(2).exists()


def test_reconstructions_of_the_wrong_size_and_missing_files_are_broken(tmp_path: Path) -> None:
    run = _run(tmp_path / "run", rows=8)
    assert run.broken(0, rows=9) == [(run.recon(0), f"{run.recon(0)} holds 8 rows for 9 observations")]
    run.checkpoint(1).unlink()
    assert run.broken(1) == []  # absent: em-train simply does the work
    assert run.broken(1, missing=True) == [(run.checkpoint(1), f"{run.checkpoint(1)} is missing")]
    with pytest.raises(DiffemError, match="lap_001.safetensors is missing; rerun em-train"):
        run.verify_laps()


def test_a_checkpoint_without_checksum_is_refused_not_deleted(tmp_path: Path, monkeypatch) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    monkeypatch.delenv("DIFFEM_TRUST_UNVERIFIED", raising=False)
    run = _run(tmp_path / "run", laps=1)
    with safe_open(str(run.checkpoint(1)), framework="pt") as f:
        raw = {k: v for k, v in f.metadata().items() if k != "checksum"}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(run.checkpoint(1)), metadata=raw)
    with pytest.raises(DiffemError, match="carries no checksum"):
        run.redo_broken(8, print)
    assert run.checkpoint(1).exists()
    monkeypatch.setenv("DIFFEM_TRUST_UNVERIFIED", "1")
    assert run.redo_broken(8, print) == []


def test_a_broken_uncond_checkpoint_is_trained_again(tmp_path: Path) -> None:
    run = _run(tmp_path / "run", laps=1)
    ckpt = run.ckpt_dir / "uncond.safetensors"
    ckpt.write_bytes(run.checkpoint(1).read_bytes())
    assert not run.redo_broken_checkpoint(ckpt, print) and ckpt.exists()
    data = bytearray(ckpt.read_bytes())
    data[-8:] = bytes(b ^ 0xFF for b in data[-8:])  # the last weights' bytes
    ckpt.write_bytes(data)
    lines: list[str] = []
    assert run.redo_broken_checkpoint(ckpt, lines.append) and not ckpt.exists()
    assert lines == [f"{ckpt}: checksum mismatch (the file was modified or corrupted); training it again"]


def test_log_drops_a_fragment_left_by_a_kill(tmp_path: Path) -> None:
    run = _run(tmp_path / "run", laps=0)
    with open(run.metrics, "a") as f:
        f.write('{"event": "lap", "la')
    run.log({"event": "lap", "lap": 1})
    assert [r["lap"] for r in run.records()] == [0, 1]
    assert run.metrics.read_text().endswith('"lap": 1}\n')


def _state(run: Run, tag: dict, epoch: int) -> None:
    meta = {"tag": tag, "epoch": epoch, "step": 4 * epoch, "ema_updates": 4 * epoch, "loss": 0.5}
    save_tensors(run.state, {"model.w": torch.zeros(2)}, meta)


def test_an_epoch_record_lost_between_state_and_log_is_taken_from_the_state(tmp_path: Path) -> None:
    run = _run(tmp_path / "run", laps=1)
    run.log({"event": "epoch", "lap": 2, "epoch": 1, "step": 4, "loss": 0.7})
    _state(run, {"lap": 2, "fingerprint": INFO["fingerprint"], "method": "diffem"}, epoch=2)  # then killed
    run.prepare(_cfg(), INFO, force=False)
    epochs = [r for r in run.records() if r["event"] == "epoch"]
    assert epochs[-1] == {"event": "epoch", "lap": 2, "epoch": 2, "step": 8, "loss": 0.5, "recovered": True}
    run.prepare(_cfg(), INFO, force=False)  # once only
    assert len([r for r in run.records() if r["event"] == "epoch"]) == 2
    assert run.state.exists()  # lap 2 has no checkpoint yet: its state resumes it


def test_a_state_whose_checkpoint_was_saved_is_removed(tmp_path: Path) -> None:
    run = _run(tmp_path / "run", laps=1)
    _state(run, {"lap": 1, "fingerprint": INFO["fingerprint"], "method": "diffem"}, epoch=3)
    run.prepare(_cfg(), INFO, force=False)
    assert not run.state.exists()
    uncond = _run(tmp_path / "uncond", laps=0)
    (uncond.ckpt_dir / "uncond.safetensors").write_bytes(run.checkpoint(1).read_bytes())
    _state(uncond, {"uncond": INFO["fingerprint"]}, epoch=1)  # killed after the checkpoint's rename
    uncond.prepare(_cfg(), INFO, force=False)
    assert not uncond.state.exists()


def test_force_starts_over_a_run_but_never_a_foreign_folder(tmp_path: Path) -> None:
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    for force in (False, True):
        with pytest.raises(DiffemError, match="is not a diffem run") as err:
            Run(stranger).prepare(_cfg(), INFO, force=force)
        assert "--force replaces only a diffem RUN" in str(err.value)
    assert [p.name for p in stranger.iterdir()] == ["notes.txt"]
    # a RUN killed right after creating its folders is a RUN still
    skeleton = tmp_path / "skeleton"
    for name in ("checkpoints", "recon"):
        (skeleton / name).mkdir(parents=True)
    Run(skeleton).prepare(_cfg(), INFO, force=False)
    assert json.loads((skeleton / "run.json").read_text()) == INFO


def test_force_removes_every_file_diffem_wrote_and_keeps_the_rest(tmp_path: Path) -> None:
    """Starting over leaves no stale output of the old run (a figure's PDF, a report, the
    unconditional samples compare reuses), and keeps the user's own files."""
    run = _run(tmp_path / "run", laps=1)
    for name in ("metrics.png", "metrics.pdf", "report.json", "report.png", "notes.txt"):
        (run.root / name).write_text("old")
    for name in ("samples-uncond", "uncond", "logs"):
        (run.root / name).mkdir()
        (run.root / name / "diffem.json").write_text("{}")
    cfg = _cfg()
    cfg.seed += 1
    run.prepare(cfg, INFO, force=True)
    kept = sorted(p.relative_to(run.root).as_posix() for p in run.root.rglob("*"))
    assert kept == ["checkpoints", "config.yaml", "notes.txt", "recon", "run.json", "samples", "state"]


def _drop(run: Run, *keys: str) -> None:
    """Remove dotted ``keys`` from ``run``'s config.yaml, as an older diffem wrote it."""
    written = yaml.safe_load(run.config_file.read_text())
    for key in keys:
        section, _, name = key.partition(".")
        del (written[section] if name else written)[name or section]
    run.config_file.write_text(yaml.safe_dump(written, sort_keys=False))


def test_keys_an_older_run_lacks_constrain_nothing_and_are_then_recorded(tmp_path: Path) -> None:
    """Resuming a RUN written before a key existed takes the key's value from the configuration
    given, says so, and records it: from then on the key is checked like any other."""
    run = _run(tmp_path / "run", laps=1)
    _drop(run, "cond.gaussian_shrinkage", "train.augment")
    cfg = _cfg()
    cfg.options["cond"].gaussian_shrinkage = "off"
    assert run.prepare(cfg, INFO, force=False) == ("train.augment", "cond.gaussian_shrinkage")
    note = run.lacked_note(("train.augment", "cond.gaussian_shrinkage"), cfg, {"cond"})
    assert note is not None and "cond.gaussian_shrinkage=off" in note and "augment" not in note
    assert run.lacked_note(("train.augment",), cfg, {"cond"}) is None
    assert yaml.safe_load(run.config_file.read_text())["cond"]["gaussian_shrinkage"] == "off"
    assert run.prepare(cfg, INFO, force=False) == ()
    cfg.options["cond"].gaussian_shrinkage = "auto"
    with pytest.raises(DiffemError, match=r"another configuration \(cond.gaussian_shrinkage"):
        run.prepare(cfg, INFO, force=False)


def test_a_top_level_key_an_older_run_lacks_is_taken_too(tmp_path: Path) -> None:
    run = _run(tmp_path / "run", laps=1)
    _drop(run, "seed")
    cfg = _cfg()
    cfg.seed = 7
    assert run.prepare(cfg, INFO, force=False) == ("seed",)
    assert "seed=7" in (run.lacked_note(("seed",), cfg, {"seed"}) or "")
    assert yaml.safe_load(run.config_file.read_text())["seed"] == 7


def test_a_key_the_run_holds_with_another_value_is_still_refused(tmp_path: Path) -> None:
    run = _run(tmp_path / "run", laps=1)
    _drop(run, "cond.gaussian_shrinkage")
    cfg = _cfg()
    cfg.train.epochs += 1
    with pytest.raises(DiffemError, match=r"another configuration \(train.epochs"):
        run.prepare(cfg, INFO, force=False)


@pytest.mark.parametrize(
    "key, other",
    [
        ("train.epochs", 7),
        ("sample.keep_observed", False),
        ("em.gaussian_shrinkage", "off"),
        ("eval.metrics", ["a", "b"]),
    ],
)
def test_a_refusal_names_the_set_that_resumes_the_run(tmp_path: Path, key: str, other: object) -> None:
    """A RUN held with another value of a key (a default changed since, say) is refused with the
    ``--set`` that gives the RUN's value back, and that ``--set``, read as the CLI reads it,
    resumes it."""
    run = _run(tmp_path / "run", laps=1)
    cfg = _cfg()
    section, name = key.split(".")
    setattr(getattr(cfg, section), name, other)
    with pytest.raises(DiffemError, match=rf"another configuration \({re.escape(key)}: ") as err:
        run.prepare(cfg, INFO, force=False)
    hint = re.search(r"--set (\S+) resumes it", str(err.value))
    assert hint is not None, str(err.value)
    _apply(cfg, parse_sets([hint.group(1)]))
    assert run.prepare(cfg, INFO, force=False) == ()


# --- through the command line ----------------------------------------------------------------------

TRAIN = [*TINY_MLP, *sets("train.batch_size=32", "train.epochs=1"), *QUICK]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """Observations and a finished 3-lap RUN; tests work on copies."""
    root = tmp_path_factory.mktemp("runs")
    run_ok("corrupt", "manifold:samples=64", root / "obs", "--channel", "projection")
    run_ok("em-train", root / "obs", root / "run", "--laps", 3, *TRAIN)
    return root


@pytest.fixture
def copy(finished: Path, tmp_path: Path) -> Path:
    shutil.copytree(finished / "run", tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_a_broken_last_checkpoint_is_reported_then_redone(finished, copy, cli, damage) -> None:
    ckpt = copy / "checkpoints/lap_003.safetensors"
    if damage == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    else:
        _flip(ckpt)
    code, _, err = cli("report", copy)
    assert code == 2 and "lap_003.safetensors" in error_line(err) and "to redo lap 3" in error_line(err)
    assert not (copy / "report.json").exists()
    code, _, err = cli("em-train", finished / "obs", copy, "--laps", 3, *TRAIN)
    assert code == 0, err
    assert "lap 3: " in err and "redoing it" in err
    assert torch.equal(_weights(ckpt), _weights(finished / "run/checkpoints/lap_003.safetensors"))
    assert cli("report", copy)[0] == 0


def _weights(path: Path) -> torch.Tensor:
    from diffem_cli.diffusion.checkpoint import load_checkpoint

    return torch.cat([t.reshape(-1) for _, t in sorted(load_checkpoint(path).weights.items())])


def test_em_train_resumes_a_run_from_before_a_key_and_names_the_key(finished, copy, cli) -> None:
    _drop(Run(copy), "em.gaussian_shrinkage")
    code, _, err = cli("em-train", finished / "obs", copy, "--laps", 3, *TRAIN)
    assert code == 0, err
    assert "predates 1 key(s)" in err and "em.gaussian_shrinkage=auto" in err
    assert "gaussian_shrinkage" in yaml.safe_load((copy / "config.yaml").read_text())["em"]


def test_a_fragment_in_metrics_does_not_swallow_the_rewritten_record(finished, copy, cli) -> None:
    lines = (copy / "metrics.jsonl").read_text().splitlines()
    last = max(i for i, line in enumerate(lines) if json.loads(line)["event"] == "lap")
    cut = lines[last][: len(lines[last]) // 2]  # the lap-3 record, cut short by a full disk
    (copy / "metrics.jsonl").write_text("\n".join([*lines[:last], cut]))
    code, _, err = cli("em-train", finished / "obs", copy, "--laps", 3, *TRAIN)
    assert code == 0, err
    assert sorted(Run(copy).lap_records()) == [0, 1, 2, 3]
    assert all(json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines())


@pytest.mark.parametrize("tamper", ["flipped", "sigma"])
def test_tampered_observations_are_refused(finished, cli, tmp_path, tamper) -> None:
    obs = tmp_path / "obs"
    shutil.copytree(finished / "obs", obs)
    if tamper == "flipped":
        _flip(next(obs.glob("*.arrow")))
    else:
        manifest = json.loads((obs / "diffem.json").read_text())
        manifest["channel"]["params"]["sigma"] = 0.5
        (obs / "diffem.json").write_text(json.dumps(manifest))
    ckpt = finished / "run/checkpoints/lap_001.safetensors"
    for argv in (
        ("em-train", obs, tmp_path / "run", "--laps", 1, *TRAIN),
        ("reconstruct", ckpt, obs, tmp_path / "rec", "--steps", 2),
    ):
        code, _, err = cli(*argv)
        assert code == 2 and error_line(err) == f"error: {obs}: checksum mismatch {WHY}", err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["obs"]
