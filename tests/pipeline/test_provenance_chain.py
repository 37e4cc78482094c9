"""Provenance through the whole chain on tiny digits: corrupt -> em-train (1 lap) -> reconstruct ->
train-uncond -> export. Every folder and checkpoint records the steps before it; the exported model
card lists them under YAML front matter; ``--push-to-hub`` without a connection says so in one line
and keeps the export."""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

import datasets
import pytest
import yaml
from helpers import FAST, TINY_UNET, error_line, run_ok

from diffem_cli.diffusion.checkpoint import load_checkpoint
from diffem_cli.io.provenance import chain_of, read_chain
from diffem_cli.io.store import read_manifest
from diffem_cli.pipeline.export import load_export

CHAIN = ["corrupt", "em-train", "reconstruct", "train-uncond", "export"]


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("provenance")
    run_ok(
        "corrupt", "digits", root / "obs", "--channel", "mask", "-p", "rho=0.5", "--limit", 32, "--seed", 3
    )
    run_ok("em-train", root / "obs", root / "run", "--laps", 1, *FAST, *TINY_UNET)
    run_ok(
        "reconstruct", root / "run/checkpoints/lap_001.safetensors", root / "obs", root / "rec", "--steps", 2
    )
    run_ok("train-uncond", root / "rec", root / "urun", *FAST, *TINY_UNET)
    run_ok("export", root / "urun/checkpoints/uncond.safetensors", root / "exp", "--license", "mit")
    return root


def _commands(steps: list[dict]) -> list[str]:
    return [s["command"] for s in steps]


def test_every_output_extends_its_inputs_chain(chain):
    obs = read_manifest(chain / "obs")
    assert _commands(chain_of(obs)) == ["corrupt"]
    corrupt = chain_of(obs)[0]
    assert corrupt["channel"]["name"] == "mask" and corrupt["channel"]["params"]["rho"] == 0.5
    assert corrupt["params"]["seed"] == 3 and corrupt["params"]["source"]["spec"] == "digits"
    assert corrupt["inputs"] == [{"path": "digits"}]
    lap = chain_of(read_manifest(chain / "run/recon/lap_001"))
    assert _commands(lap) == ["corrupt", "em-train"] and lap[0] == corrupt
    ckpt = load_checkpoint(chain / "run/checkpoints/lap_001.safetensors")
    em = ckpt.info.provenance[-1]
    assert _commands(ckpt.info.provenance) == ["corrupt", "em-train"]
    assert em["method"] == "diffem" and em["laps"] == 1 and em["channel"]["name"] == "mask"
    assert em["run"] == str((chain / "run").resolve()) and em["params"]["config"]["em"]["method"] == "diffem"
    assert em["inputs"][0]["path"] == str((chain / "obs").resolve())
    assert em["inputs"][0]["checksum"] == obs["checksum"]
    assert _commands(chain_of(read_manifest(chain / "run/recon/lap_000"))) == ["corrupt", "em-train"]
    assert chain_of(read_manifest(chain / "run/recon/lap_000"))[-1]["laps"] == 0
    # reconstruct merges the observations' chain and the checkpoint's: the shared corrupt step once
    rec = chain_of(read_manifest(chain / "rec"))
    assert _commands(rec) == ["corrupt", "em-train", "reconstruct"] and rec[:2] == ckpt.info.provenance
    from safetensors import safe_open

    with safe_open(str(chain / "run/checkpoints/lap_001.safetensors"), framework="pt") as f:
        assert rec[-1]["inputs"][0]["checksum"] == f.metadata()["checksum"]  # the file it read
    assert rec[-1]["params"]["steps"] == 2 and rec[-1]["laps"] == 1 and rec[-1]["method"] == "diffem"
    uncond = load_checkpoint(chain / "urun/checkpoints/uncond.safetensors").info.provenance
    assert _commands(uncond) == CHAIN[:4] and uncond[:3] == rec
    assert uncond[-1]["run"] == str((chain / "urun").resolve()) and uncond[-1]["method"] == "uncond"


def test_steps_carry_version_commit_and_time(chain):
    for s in read_chain(chain / "urun/checkpoints/uncond.safetensors"):
        assert set(s) == {
            "command",
            "inputs",
            "channel",
            "params",
            "method",
            "laps",
            "run",
            "diffem_version",
            "git_commit",
            "created",
        }
        assert s["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", s["git_commit"])
        assert datetime.fromisoformat(s["created"]).utcoffset().total_seconds() == 0


def test_export_lists_the_whole_chain(chain):
    meta = json.loads((chain / "exp/diffem.json").read_text())
    steps = meta["provenance"]
    assert _commands(steps) == CHAIN
    assert steps[-1]["params"]["license"] == "mit"
    assert _commands(chain_of(load_export(chain / "exp").meta)) == CHAIN
    card = (chain / "exp/README.md").read_text()
    _, front, body = card.split("---\n", 2)
    front = yaml.safe_load(front)
    assert front["license"] == "mit" and front["library_name"] == "diffusers"
    assert front["pipeline_tag"] == "unconditional-image-generation"
    assert front["tags"][:2] == ["diffem", "diffusion"] and "datasets" not in front  # digits: no Hub name
    assert "License: not set" not in body
    assert "EM method: diffem" in body and "EM laps: reconstructions of EM lap 1" in body
    assert "EM RUN: run" in body and "data source: digits (32 samples)" in body
    assert "corruption channel: mask" in body and "not recorded" not in body
    listed = [line for line in body.splitlines() if re.match(r"\d+\. ", line)]
    assert [line.split(". ", 1)[1].split(",")[0].split(" ")[0] for line in listed] == CHAIN
    assert "method diffem, lap 1, RUN run" in listed[1]
    assert "DDPMPipeline.from_pretrained" in body and "## Limits" in body


def test_descriptions_say_what_a_folder_holds(chain):
    obs = datasets.load_from_disk(str(chain / "obs")).info.description
    assert "Corrupted observations, written by 'diffem corrupt': 32 image samples" in obs and "rho=0.5" in obs
    rec = datasets.load_from_disk(str(chain / "rec")).info.description
    assert "Reconstructions" in rec and "Method: diffem" in rec and "'diffem reconstruct'" in rec
    lap = datasets.load_from_disk(str(chain / "run/recon/lap_001")).info.description
    assert "EM lap 1" in lap and "'diffem em-train'" in lap


def test_push_to_hub_offline_keeps_the_export(chain, cli, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    def unreachable(*args, **kwargs):
        raise _connect_error()

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_not_a_token")
    monkeypatch.setattr(huggingface_hub, "create_repo", unreachable)
    monkeypatch.setattr(huggingface_hub, "upload_folder", unreachable)
    ckpt = chain / "urun/checkpoints/uncond.safetensors"
    repo = "someone/tiny-digits"
    # HF_HUB_OFFLINE: said at once; then a network that fails as huggingface_hub reports it
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    code, _, err = cli("export", ckpt, tmp_path / "exp", "--push-to-hub", repo)
    assert code == 2 and "offline (HF_HUB_OFFLINE is set)" in error_line(err)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    code, _, err = cli("export", ckpt, tmp_path / "exp", "--push-to-hub", repo, "--force")
    line = error_line(err)
    assert code == 2 and "cannot be reached" in line and f"kept in {tmp_path / 'exp'}" in line
    assert load_export(tmp_path / "exp").kind == "unconditional"
    card = (tmp_path / "exp/README.md").read_text()
    assert f"DDPMPipeline.from_pretrained('{repo}')" in card
    assert yaml.safe_load(card.split("---\n")[1])["license"] == "other" and "License: not set" in card
    # not logged in: one line before any upload is tried
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    code, _, err = cli("export", ckpt, tmp_path / "exp2", "--push-to-hub", repo)
    assert code == 2 and "not logged in" in error_line(err) and (tmp_path / "exp2/diffem.json").exists()
    code, _, err = cli("export", ckpt, tmp_path / "exp3", "--push-to-hub", "not a repo id")
    assert code == 2 and "not a Hub repository id" in error_line(err) and not (tmp_path / "exp3").exists()


def _connect_error() -> Exception:
    """The transport error huggingface_hub's HTTP client raises when the Hub cannot be reached."""
    import importlib

    for name in ("httpx2", "httpx"):
        try:
            return importlib.import_module(name).ConnectError(
                "[Errno -3] Temporary failure in name resolution"
            )
        except ImportError:
            continue
    from huggingface_hub.errors import OfflineModeIsEnabled

    return OfflineModeIsEnabled("offline")
