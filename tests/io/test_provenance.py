"""The provenance module: steps, chains read from manifests and checkpoints, merging, and files
written before provenance existed (an empty chain: they load and export as before)."""

from __future__ import annotations

import json
import re
from datetime import datetime

import datasets
import torch
import yaml

from diffem_cli import __version__
from diffem_cli.diffusion.checkpoint import load_checkpoint, save_checkpoint
from diffem_cli.diffusion.nets import build_network
from diffem_cli.io import provenance
from diffem_cli.io.store import fingerprint_dataset, read_manifest, write_dataset
from diffem_cli.pipeline.export import export_checkpoint

MLP = {"type": "mlp", "width": 16, "depth": 2, "emb_dim": 8}
OLD_META = {
    "kind": "conditional",
    "network": MLP,
    "cond_size": 3,
    "data": {
        "shape": [3],
        "kind": "vector",
        "value_range": [-2, 2],
        "source": {"spec": "hf:someone/pts:train"},
    },
    "channel": {"name": "projection", "params": {"m": 1}},
    "lap": 2,
    "method": "diffem",
}


def test_a_step_records_what_when_and_which_diffem(monkeypatch):
    s = provenance.step("corrupt", inputs=[{"path": "digits"}], params={"seed": 1}, laps=None)
    keys = "command inputs channel params method laps run diffem_version git_commit created"
    assert list(s) == keys.split()
    assert s["diffem_version"] == __version__ and s["params"] == {"seed": 1} and s["run"] is None
    assert s["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", s["git_commit"])
    assert datetime.fromisoformat(s["created"]).utcoffset().total_seconds() == 0
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "86400")  # reproducible builds pin the time
    assert provenance.step("corrupt")["created"] == "1970-01-02T00:00:00+00:00"


def test_git_commit_never_fails(monkeypatch):
    provenance.git_commit.cache_clear()
    monkeypatch.setenv("PATH", "")  # no git on the PATH
    try:
        assert provenance.git_commit() is None
    finally:
        provenance.git_commit.cache_clear()


def test_chains_are_read_leniently_and_merged_once():
    assert provenance.chain_of(None) == provenance.chain_of({}) == []
    assert provenance.chain_of({"provenance": "not json"}) == provenance.chain_of({"provenance": [1]}) == []
    a, b, c = ({"command": n} for n in ("corrupt", "em-train", "reconstruct"))
    assert provenance.chain_of({"provenance": json.dumps([a, b])}) == [a, b]
    # reconstruct reads observations ([a]) and a checkpoint ([a, b]): a once, then b, then itself
    assert provenance.extend([a], [a, b], then=c) == [a, b, c]
    assert provenance.last([a, b, {"command": "em-train", "laps": 2}], "em-train") == {
        "command": "em-train",
        "laps": 2,
    }


def test_old_checkpoint_without_provenance_loads_and_exports(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "old.safetensors"
    save_checkpoint(path, build_network(MLP, (3,), 3), OLD_META)
    ckpt = load_checkpoint(path)
    assert "provenance" not in ckpt.meta and ckpt.info.provenance == []
    assert provenance.read_chain(path) == []
    meta = export_checkpoint(path, tmp_path / "exp")
    assert [s["command"] for s in meta["provenance"]] == ["export"]
    assert meta["provenance"][0]["inputs"][0]["checksum"].startswith("sha256:")
    card = (tmp_path / "exp/README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["license"] == "other" and "library_name" not in front and "pipeline_tag" not in front
    assert front["tags"] == ["diffem", "diffusion", "posterior-sampling", "vector-data"]
    assert front["datasets"] == ["someone/pts"]  # a Hub source is named for the Hub
    assert "1. export" in card and "EM laps: lap 2" in card and "corruption channel: projection" in card


def test_provenance_leaves_the_fingerprint_alone_and_describes_the_folder(tmp_path):
    chunk = [{"x": torch.zeros(4, 3)}]
    base = {"kind": "clean", "data_shape": [3], "data_kind": "vector", "value_range": [-2, 2]}
    write_dataset(tmp_path / "a", iter(chunk), base)
    done = provenance.step("corrupt", params={"seed": 0})
    write_dataset(tmp_path / "b", iter(chunk), {**base, "provenance": [done]})
    assert fingerprint_dataset(tmp_path / "a") == fingerprint_dataset(tmp_path / "b")
    assert read_manifest(tmp_path / "a")["checksum"] == read_manifest(tmp_path / "b")["checksum"]

    described = datasets.load_from_disk(str(tmp_path / "b")).info.description
    assert described.startswith("Clean samples, written by 'diffem corrupt': 4 vector samples of shape [3].")
    assert "written by diffem:" in datasets.load_from_disk(str(tmp_path / "a")).info.description
