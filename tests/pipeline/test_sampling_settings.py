"""``reconstruct`` and ``sample`` draw as the checkpoint's run did, unless the user says otherwise."""

from __future__ import annotations

import json

import yaml
from helpers import FAST, TINY_MLP, run_ok, sets

from diffem_cli.diffusion.sampling import SampleConfig
from diffem_cli.pipeline.reconstruct import checkpoint_sampling

PC = sets("sample.steps=3", "sample.corrections=2", "sample.corrector_tau=0.2")


def _manifest(folder) -> dict:
    return json.loads((folder / "diffem.json").read_text())


def _sampling(manifest: dict) -> tuple:
    return tuple(manifest[k] for k in ("steps", "corrections", "corrector_tau"))


def test_reconstruct_and_sample_keep_the_checkpoint_settings_unless_overridden(tmp_path):
    run_ok("corrupt", "manifold:samples=64", tmp_path / "obs", "-c", "projection")
    run_ok("em-train", tmp_path / "obs", tmp_path / "run", "--laps", 1, *TINY_MLP, *FAST, *PC)
    ckpt = tmp_path / "run/checkpoints/lap_001.safetensors"
    run_ok("reconstruct", ckpt, tmp_path / "obs", tmp_path / "rec")
    assert _sampling(_manifest(tmp_path / "rec")) == (3, 2, 0.2)
    run_ok("reconstruct", ckpt, tmp_path / "obs", tmp_path / "rec2", "--steps", 2, "--corrections", 0)
    assert _sampling(_manifest(tmp_path / "rec2")) == (2, 0, 0.2)
    run_ok("train-uncond", tmp_path / "rec", tmp_path / "u", *TINY_MLP, *FAST, *PC)
    run_ok("sample", tmp_path / "u/checkpoints/uncond.safetensors", tmp_path / "s", "-n", 8)
    assert _sampling(_manifest(tmp_path / "s")) == (3, 2, 0.2)
    run_ok("sample", tmp_path / "u/checkpoints/uncond.safetensors", tmp_path / "s2", "-n", 8, "--steps", 5)
    assert _sampling(_manifest(tmp_path / "s2")) == (5, 2, 0.2)


def test_a_checkpoint_without_settings_takes_its_runs_config(tmp_path):
    (tmp_path / "run/checkpoints").mkdir(parents=True)
    (tmp_path / "run/config.yaml").write_text(yaml.safe_dump({"sample": {"steps": 7, "corrections": 1}}))
    ckpt = tmp_path / "run/checkpoints/lap_002.safetensors"
    got = checkpoint_sampling({}, ckpt, {"batch_size": 9})
    assert (got.steps, got.corrections, got.batch_size) == (7, 1, 9)
    assert checkpoint_sampling({}, tmp_path / "elsewhere.safetensors") == SampleConfig()
    given = SampleConfig(steps=4)
    assert checkpoint_sampling({"sample": {"steps": 9}}, ckpt, given) is given
