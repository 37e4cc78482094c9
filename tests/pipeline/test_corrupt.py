"""``corrupt``: reproducible observation folders, channel statistics, outputs, and bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import datasets
import pytest
import torch
from helpers import file_bytes
from PIL import Image

from diffem_channels.base import Channel, ChannelError, Param, sample_seeds
from diffem_cli.cli.app import run
from diffem_cli.io.observations import recorrupt
from diffem_cli.io.sources import TensorSource, load_source
from diffem_cli.io.store import columns, read_dataset
from diffem_cli.pipeline.corrupt import corrupt_dataset


def _tree(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


def test_cli_same_seed_gives_identical_folders(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")  # pins the provenance's time, the one byte that moves
    args = ["corrupt", "digits", "--channel", "mask", "-p", "rho=0.5", "-p", "sigma=0.1", "--limit", "300"]
    assert run([*args[:2], str(tmp_path / "a"), *args[2:], "--seed", "3"]) == 0
    assert run([*args[:2], str(tmp_path / "b"), *args[2:], "--seed", "3"]) == 0
    assert run([*args[:2], str(tmp_path / "c"), *args[2:], "--seed", "4"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 3 and out[0].startswith("wrote 300 rows (y, mask, index, label)")
    a, b, c = (file_bytes(tmp_path / n) for n in "abc")
    assert a == b
    assert a.keys() == c.keys() and a != c


def test_chunk_size_does_not_change_bytes(tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")  # pins the provenance's time
    src = load_source("manifold:samples=257")
    chan = _make("projection")
    corrupt_dataset(src, chan, tmp_path / "big", seed=1, chunk_size=1024, progress=False)
    corrupt_dataset(src, chan, tmp_path / "small", seed=1, chunk_size=10, clean_out=tmp_path / "clean")
    assert file_bytes(tmp_path / "big") == file_bytes(tmp_path / "small")


def test_mask_fraction_on_digits(tmp_path):
    assert run(["corrupt", "digits", str(tmp_path / "obs"), "--channel", "mask", "-p", "rho=0.75"]) == 0
    ds = datasets.load_from_disk(str(tmp_path / "obs"))
    assert set(ds.column_names) == {"y", "mask", "index", "label"} and len(ds) == 1797
    cols = columns(ds, ["y", "mask", "index"])
    missing = 1 - cols["mask"].mean().item()
    assert abs(missing - 0.75) < 0.01
    assert torch.equal(cols["index"], torch.arange(1797))
    assert (cols["y"][cols["mask"].expand_as(cols["y"]) == 0] == 0).all()


def test_a_split_is_the_same_rows_of_the_whole(tmp_path):
    """``--skip``/``--limit`` cut rows out of a source: each keeps its index, its clean sample and,
    through its index, its corruption; the two halves of a split together are the whole."""
    base = ["corrupt", "digits", "--channel", "mask", "-p", "rho=0.5", "-p", "sigma=0.1", "--seed", "2"]
    parts = {"whole": ["--limit", "50"], "head": ["--limit", "30"], "tail": ["--skip", "30", "--limit", "20"]}
    for name, cut in parts.items():
        assert (
            run(
                [*base[:2], str(tmp_path / name), *base[2:], *cut, "--clean-out", str(tmp_path / f"{name}-x")]
            )
            == 0
        )
    keys = ["y", "mask", "index", "label"]
    whole = columns(read_dataset(tmp_path / "whole")[0], keys)
    head = columns(read_dataset(tmp_path / "head")[0], keys)
    tail = columns(read_dataset(tmp_path / "tail")[0], keys)
    assert torch.equal(tail["index"], torch.arange(30, 50))
    for k in keys:
        assert torch.equal(torch.cat([head[k], tail[k]]), whole[k]), k
    clean = columns(read_dataset(tmp_path / "tail-x")[0], ["x", "index"])
    assert torch.equal(clean["index"], torch.arange(30, 50))
    assert torch.equal(clean["x"], load_source("digits").read(30, 50))
    assert read_dataset(tmp_path / "tail")[1]["source"]["skip"] == 30


def test_digit_labels_survive_corrupt(tmp_path):
    from sklearn.datasets import load_digits

    argv = ["corrupt", "digits", str(tmp_path / "obs"), "-c", "noise", "--limit", "50"]
    assert run([*argv, "--clean-out", str(tmp_path / "clean"), "--chunk-size", "16"]) == 0
    target = load_digits().target[:50].tolist()
    for name in ("obs", "clean"):
        ds = datasets.load_from_disk(str(tmp_path / name))
        assert ds.features["label"] == datasets.ClassLabel(names=list("0123456789"))
        assert list(ds["label"]) == target and columns(ds, ["index"])["index"].tolist() == list(range(50))


def test_projection_on_manifold_with_clean_out_and_preview(tmp_path):
    obs, clean, png = tmp_path / "obs", tmp_path / "clean", tmp_path / "p.png"
    argv = ["corrupt", "manifold", str(obs), "--channel", "projection", "--clean-out", str(clean)]
    assert run([*argv, "--preview", str(png)]) == 0
    ds, manifest = read_dataset(obs)
    assert manifest["kind"] == "observations" and manifest["channel"]["name"] == "projection"
    assert manifest["data_shape"] == [5] and manifest["data_kind"] == "vector"
    assert manifest["value_range"] == [-2.0, 2.0] and manifest["seed"] == 0
    assert manifest["source"]["spec"].startswith("manifold:samples=16384")
    cols = columns(ds, ["y", "A", "index"])
    cds, cman = read_dataset(clean)
    assert cman["kind"] == "clean" and cds.column_names == ["x", "index"]
    x = columns(cds, ["x"])["x"]
    assert torch.equal(x, torch.cat(list(load_source("manifold").batches(4096))))
    assert torch.allclose(cols["A"].norm(dim=-1), torch.ones(1), atol=1e-5)
    resid = cols["y"] - torch.einsum("bmn,bn->bm", cols["A"], x)
    assert abs(resid.std().item() - 0.01) < 0.001
    with Image.open(png) as img:
        img.verify()


def test_image_preview_and_library_manifest(tmp_path):
    src = load_source("digits", limit=40)
    manifest = corrupt_dataset(
        src, _make("mask"), tmp_path / "o", preview=tmp_path / "p.png", clean_out=tmp_path / "c", chunk_size=7
    )
    assert manifest["num_rows"] == 40 and manifest["channel"]["params"]["rho"] == 0.75
    with Image.open(tmp_path / "p.png") as img:
        assert img.format == "PNG" and img.size[0] > 16 * 64
    cds, _ = read_dataset(tmp_path / "c")
    assert torch.equal(columns(cds, ["x"])["x"], src.read(0, 40))
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_force_overwrites(tmp_path, capsys):
    out = tmp_path / "o"
    assert run(["corrupt", "digits", str(out), "--channel", "mask", "--limit", "5"]) == 0
    assert run(["corrupt", "digits", str(out), "--channel", "mask", "--limit", "9", "--force"]) == 0
    assert len(read_dataset(out)[0]) == 9


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["digits", "{o}", "--channel", "mask_"], "unknown channel 'mask_'"),
        (["digits", "{o}", "--channel", "mask", "-p", "rh=0.5"], "no parameter 'rh'"),
        (["digits", "{o}", "--channel", "mask", "-p", "rho=1.5"], "rho"),
        (["digits", "{o}", "--channel", "mask", "-p", "rho"], "KEY=VALUE"),
        (["digits", "{o}", "--channel", "projection"], "accepts vector data"),
        (["nowhere", "{o}", "--channel", "mask"], "source 'nowhere' not found"),
        (["digits", "{t}/missing/o", "--channel", "mask"], "does not exist"),
        (["digits", "{exists}", "--channel", "mask"], "already exists"),
        (["digits", "{o}", "--channel", "mask", "--clean-out", "{exists}"], "already exists"),
        (["digits", "{o}", "--channel", "mask", "--preview", "{png}"], "already exists"),
        (["digits", "{o}", "--channel", "mask", "--preview", "{t}/p.jpg"], ".png"),
        (["digits", "{o}", "--channel", "mask", "--limit", "0"], "--limit"),
        (["digits", "{o}", "--channel", "mask", "--skip", "-1"], "--skip"),
        (["digits", "{o}", "--channel", "mask", "--skip", "1797"], "none left after skipping 1797"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, argv, message):
    (tmp_path / "exists").mkdir()
    (tmp_path / "old.png").write_bytes(b"x")
    before = _tree(tmp_path)
    subs = {"o": tmp_path / "o", "t": tmp_path, "exists": tmp_path / "exists", "png": tmp_path / "old.png"}
    assert run(["corrupt", *(a.format(**subs) for a in argv)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert _tree(tmp_path) == before


class _Failing(Channel):
    """A channel that fails once it has seen more than ``at`` samples."""

    name = "failing"
    description = "fails after `at` samples"
    data_kinds = frozenset({"vector"})
    params = (Param("at", int, 50),)
    seen = 0

    def corrupt(self, x, seeds):
        self.seen += len(x)
        if self.seen > self.at:
            raise ChannelError("cannot corrupt this sample")
        return {"y": x.clone()}


def test_failure_mid_stream_leaves_nothing(tmp_path):
    src = TensorSource(torch.zeros(100, 3))
    with pytest.raises(ChannelError, match="cannot corrupt this sample"):
        corrupt_dataset(src, _Failing(), tmp_path / "o", clean_out=tmp_path / "c", chunk_size=20)
    assert list(tmp_path.iterdir()) == []


def test_recorrupt_is_fresh_per_lap_and_reproducible():
    chan = _make("projection")
    x = load_source("manifold:samples=64").read(0, 64)
    idx = torch.arange(64)
    lap1 = recorrupt(chan, x, seed=0, lap=1, indices=idx)
    again = recorrupt(chan, x, seed=0, lap=1, indices=idx)
    lap2 = recorrupt(chan, x, seed=0, lap=2, indices=idx)
    data = chan.corrupt(x, sample_seeds(0, idx))
    assert torch.equal(lap1["A"], again["A"]) and torch.equal(lap1["y"], again["y"])
    assert not torch.allclose(lap1["A"], lap2["A"]) and not torch.allclose(lap1["A"], data["A"])
    # each sample's draw depends on its index only, not on the batch it sits in
    part = recorrupt(chan, x[10:20], seed=0, lap=1, indices=idx[10:20])
    assert torch.equal(part["A"], lap1["A"][10:20])
    chunked = recorrupt(chan, x, seed=0, lap=1, indices=idx, chunk_size=7)
    assert torch.equal(chunked["A"], lap1["A"]) and torch.equal(chunked["y"], lap1["y"])


def _make(name: str, **params) -> Channel:
    from diffem_cli.io.registry import make_channel

    return make_channel(name, params)


def test_channel_refusal_happens_before_writing(tmp_path):
    with pytest.raises(ChannelError, match="accepts vector data"):
        corrupt_dataset(load_source("digits"), _make("projection"), tmp_path / "o")
    assert list(tmp_path.iterdir()) == []


def test_rerun_after_a_kill_between_clean_and_observations_reuses_the_clean_folder(tmp_path, cli):
    """A kill after --clean-out was written but before the observations: the identical rerun
    completes (reusing the clean folder); a different command is still refused."""
    args = ["corrupt", "digits", tmp_path / "obs", "--channel", "mask", "--limit", 20, "--clean-out"]
    assert cli(*args, tmp_path / "clean")[0] == 0
    first = (tmp_path / "obs" / "data-00000-of-00001.arrow").read_bytes()
    shutil.rmtree(tmp_path / "obs")
    code, _, err = cli(*args, tmp_path / "clean")
    assert code == 0, err
    assert (tmp_path / "obs" / "data-00000-of-00001.arrow").read_bytes() == first
    shutil.rmtree(tmp_path / "obs")
    code, _, err = cli(*args[:-2], 30, "--clean-out", tmp_path / "clean")
    assert code == 2 and "already exists" in err and not (tmp_path / "obs").exists()
