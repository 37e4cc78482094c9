"""``diffem import``: a user's masked PNGs and mask images go through import -> em-train ->
reconstruct with no clean data anywhere; bad inputs are one line, exit 2, and write nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import FAST, TINY_UNET, error_line, run_ok
from PIL import Image

from diffem_cli.io.observations import Observations
from diffem_cli.io.store import read_manifest


@pytest.fixture(scope="module")
def held(tmp_path_factory) -> Path:
    """What a user holds: ``images/`` (digits, half the pixels missing, grey) and ``masks/`` (white =
    observed), written from a corrupt folder that is then removed: no clean data is left."""
    import shutil

    root = tmp_path_factory.mktemp("held")
    run_ok("corrupt", "digits", root / "obs", "-c", "mask", "-p", "rho=0.5", "--limit", 32)
    obs = Observations(root / "obs")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    for i in range(len(obs)):
        y = ((obs.obs["y"][i, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        Image.fromarray(y).save(root / "images" / f"digit_{i:02d}.png")
        Image.fromarray((obs.obs["mask"][i, 0] * 255).to(torch.uint8).numpy()).save(
            root / "masks" / f"digit_{i:02d}.png"
        )
    shutil.rmtree(root / "obs")
    return root


def test_chain_without_clean_data(cli, held: Path, tmp_path: Path) -> None:
    code, out, err = cli(
        "import", held / "images", tmp_path / "obs", "-c", "mask", "-p", "rho=0.5", "--mask", held / "masks"
    )
    assert code == 0, err
    assert "imported 32 observations (y, mask, index, file_name)" in out
    manifest = read_manifest(tmp_path / "obs")
    assert manifest["kind"] == "observations" and manifest["checksum"].startswith("sha256:")
    assert manifest["files"][:2] == ["digit_00.png", "digit_01.png"]
    assert manifest["provenance"][-1]["command"] == "import"
    run_ok("em-train", tmp_path / "obs", tmp_path / "run", "--laps", 1, *FAST, *TINY_UNET)
    run_ok(
        "reconstruct",
        tmp_path / "run/checkpoints/lap_001.safetensors",
        tmp_path / "obs",
        tmp_path / "rec",
        "--steps",
        4,
    )
    rec = read_manifest(tmp_path / "rec")
    assert rec["kind"] == "reconstructions" and rec["num_rows"] == 32
    # import -> em-train -> train-uncond -> export: the export's chain starts with the import step
    run_ok("train-uncond", tmp_path / "run/recon/lap_001", tmp_path / "urun", *FAST, *TINY_UNET)
    run_ok("export", tmp_path / "urun/checkpoints/uncond.safetensors", tmp_path / "exp")
    chain = json.loads((tmp_path / "exp/diffem.json").read_text())["provenance"]
    assert [s["command"] for s in chain] == ["import", "em-train", "train-uncond", "export"]
    assert chain[0] == manifest["provenance"][-1]
    assert chain[1]["inputs"][0]["checksum"] == manifest["checksum"]  # em-train read this import
    # --force replaces the import it wrote
    code, _, err = cli(
        "import",
        held / "images",
        tmp_path / "obs",
        "-c",
        "mask",
        "-p",
        "rho=0.5",
        "--mask",
        held / "masks",
        "--force",
    )
    assert code == 0, err


def test_import_records_its_provenance(held: Path, tmp_path: Path) -> None:
    """The manifest's chain ends with the import step: command, source, channel with its
    parameters, the options and inputs it read, version and time; read back from the folder."""
    from diffem_cli import __version__
    from diffem_cli.io.provenance import read_chain

    run_ok(
        "import", held / "images", tmp_path / "obs", "-c", "mask", "-p", "rho=0.5", "--mask", held / "masks"
    )
    chain = read_chain(tmp_path / "obs")
    assert [s["command"] for s in chain] == ["import"]  # an image folder has no chain of its own
    step = chain[0]
    assert step["channel"]["name"] == "mask" and step["channel"]["params"]["rho"] == 0.5
    source = step["params"]["source"]
    assert source["spec"] == str(held / "images") and source["n"] == 32 and source["shape"] == [1, 8, 8]
    assert source["imported"]["mask"] == f"mask images in {held / 'masks'}"
    assert step["params"]["fields"] == {"mask": str(held / "masks")}
    assert [i["path"] for i in step["inputs"]] == [str((held / s).resolve()) for s in ("images", "masks")]
    assert step["diffem_version"] == __version__ and step["created"]
    assert step["method"] is None and step["laps"] is None


def test_refusals_write_nothing(cli, held: Path, tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.mkdir()
    for f in sorted((held / "masks").iterdir())[:-1]:
        (short / f.name).write_bytes(f.read_bytes())
    flipped = tmp_path / "flipped"
    flipped.mkdir()
    for f in (held / "masks").iterdir():
        Image.fromarray(255 - np.asarray(Image.open(f))).save(flipped / f.name)
    base = ["import", held / "images", tmp_path / "out", "-c", "mask"]
    cases = [
        ([*base, "-p", "quality=3", "--mask", held / "masks"], "has no parameter 'quality'"),
        ([*base, "--mask", short], "holds 31 images"),
        ([*base, "--mask", flipped], "where its mask says missing"),
        ([*base], "pass --mask DIR"),
        ([*base, "--mask", held / "masks", "--field", "A=x.safetensors"], "reads no 'A'"),
        ([*base, "--mask", held / "masks", "--data-shape", "3,8,8"], "does not fit"),
        (["import", held / "images", tmp_path / "out", "-c", "projection"], "accepts vector data"),
    ]
    for argv, match in cases:
        code, _, err = cli(*argv)
        assert code == 2, (argv, err)
        assert match in error_line(err), (argv, err)
        assert not (tmp_path / "out").exists()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    code, _, err = cli(*base, "--mask", held / "masks", "--force")
    assert code == 2 and "diffem did not write" in error_line(err)
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
