"""``reconstruct``: a lap checkpoint alone is enough, seeds reproduce, and bad input is refused
with one line, exit 2 and nothing written."""

from __future__ import annotations

import shutil
from pathlib import Path

import datasets
import pytest
import torch
from helpers import TINY_MLP, TINY_UNET, error_line, fast_em_lap, fast_uncond, file_bytes, read_x, run_ok
from safetensors.torch import save_file

from diffem_cli.io.store import columns, read_manifest


@pytest.fixture(scope="module")
def d(tmp_path_factory) -> Path:
    """Digits (mask, blur) and manifold (5-d and 3-d) observations, a 1-lap conditional checkpoint for
    each of digits-mask and manifold-5, and an unconditional digits checkpoint."""
    root = tmp_path_factory.mktemp("rec")
    run_ok(
        "corrupt",
        "digits",
        root / "mask",
        "--channel",
        "mask",
        "-p",
        "rho=0.5",
        "--limit",
        40,
        "--clean-out",
        root / "clean",
    )
    run_ok("corrupt", "digits", root / "blur", "--channel", "blur", "--limit", 40)
    run_ok("corrupt", "manifold:samples=64", root / "m5", "--channel", "projection")
    run_ok("corrupt", "manifold:samples=64,n=3", root / "m3", "--channel", "projection")
    fast_em_lap(root / "mask", root / "drun", "--set", "em.init=observation", *TINY_UNET)
    fast_em_lap(root / "m5", root / "mrun", *TINY_MLP)
    fast_uncond(root / "clean", root / "urun", *TINY_UNET)
    # the checkpoint alone, away from its RUN folder
    shutil.copy(root / "drun/checkpoints/lap_001.safetensors", root / "digits.safetensors")
    shutil.copy(root / "mrun/checkpoints/lap_001.safetensors", root / "manifold.safetensors")
    shutil.rmtree(root / "drun")
    return root


def test_lap_checkpoint_alone_reconstructs_images(d, cli, tmp_path):
    code, _, err = cli(
        "reconstruct",
        d / "digits.safetensors",
        d / "mask",
        tmp_path / "rec",
        "--steps",
        4,
        "--per-observation",
        2,
        "--png",
        tmp_path / "png",
    )
    assert code == 0 and "error" not in err
    assert "wrote 80 reconstructions" in err
    ds = datasets.load_from_disk(str(tmp_path / "rec"))
    assert set(ds.column_names) == {"x", "index", "sample", "label"}  # digits carry their labels
    cols = columns(ds, ["x", "index", "sample"])
    assert cols["x"].shape == (80, 1, 8, 8) and torch.isfinite(cols["x"]).all()
    assert torch.equal(cols["index"], torch.arange(40).repeat(2))
    assert torch.equal(cols["sample"], torch.arange(2).repeat_interleave(40))
    from sklearn.datasets import load_digits

    assert list(ds["label"]) == load_digits().target[:40].tolist() * 2  # by the observation's index
    # two posterior draws per observation differ
    assert not torch.equal(cols["x"][:40], cols["x"][40:])
    manifest = read_manifest(tmp_path / "rec")
    assert manifest["kind"] == "reconstructions" and manifest["channel"]["name"] == "mask"
    assert manifest["data_shape"] == [1, 8, 8] and manifest["steps"] == 4
    # --png: one grid per posterior draw (40 images each, under 64), each tile captioned with its index
    grids = sorted(p.name for p in (tmp_path / "png").iterdir())
    assert grids == ["000000_000039_draw0.png", "000000_000039_draw1.png"]


def test_vector_reconstructions_and_samplers(d, cli, tmp_path):
    for sampler in ("dpm++", "ddim", "ddpm"):
        code, _, err = cli(
            "reconstruct",
            d / "manifold.safetensors",
            d / "m5",
            tmp_path / sampler,
            "--steps",
            3,
            "--sampler",
            sampler,
            "--batch-size",
            20,
        )
        assert code == 0, err
        x = read_x(tmp_path / sampler)
        assert x.shape == (64, 5) and torch.isfinite(x).all()
        assert read_manifest(tmp_path / sampler)["sampler"] == sampler
    # --png is for images only
    code, _, err = cli(
        "reconstruct",
        d / "manifold.safetensors",
        d / "m5",
        tmp_path / "v",
        "--steps",
        2,
        "--png",
        tmp_path / "vpng",
    )
    assert code == 2 and "image" in error_line(err)
    assert not (tmp_path / "v").exists() and not (tmp_path / "vpng").exists()


@pytest.mark.parametrize("sampler", ["dpm++", "ddpm"])
def test_same_seed_same_reconstructions(d, cli, tmp_path, sampler):
    def rec(name: str, seed: int) -> torch.Tensor:
        code, _, err = cli(
            "reconstruct",
            d / "manifold.safetensors",
            d / "m5",
            tmp_path / name,
            "--steps",
            4,
            "--seed",
            seed,
            "--sampler",
            sampler,
        )
        assert code == 0, err
        return read_x(tmp_path / name)

    a, b, c = rec("a", 3), rec("b", 3), rec("c", 4)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert (
        file_bytes(tmp_path / "a")["data-00000-of-00001.arrow"]
        == file_bytes(tmp_path / "b")["data-00000-of-00001.arrow"]
    )


def test_force_overwrites(d, cli, tmp_path):
    out = tmp_path / "rec"
    assert cli("reconstruct", d / "manifold.safetensors", d / "m5", out, "--steps", 2)[0] == 0
    assert cli("reconstruct", d / "manifold.safetensors", d / "m5", out, "--steps", 3, "--force")[0] == 0
    assert read_manifest(out)["steps"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _bad_files(src: Path, root: Path) -> dict[str, Path]:
    raw = src.read_bytes()
    files = {}
    files["truncated"] = root / "bad_truncated.safetensors"
    files["truncated"].write_bytes(raw[: len(raw) // 2])
    files["random"] = root / "bad_random.safetensors"
    files["random"].write_bytes(
        bytes(
            torch.randint(0, 256, (2048,), generator=torch.Generator().manual_seed(1))
            .to(torch.uint8)
            .tolist()
        )
    )
    files["foreign"] = root / "bad_foreign.safetensors"
    save_file({"weight": torch.zeros(4, 4)}, str(files["foreign"]))
    return files


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("other_channel", '"mask" in the checkpoint'),
        ("other_shape", "shape"),
        ("truncated", "not a readable safetensors file"),
        ("random", "not a readable safetensors file"),
        ("foreign", "not a diffem checkpoint"),
        ("missing", "does not exist"),
        ("missing_data", "does not exist"),
        ("data_folder_as_checkpoint", "export"),
        ("checkpoint_as_data", "not a dataset folder"),
        ("zero_per_observation", "--per-observation"),
        ("zero_steps", "--steps"),
        ("unknown_sampler", "--sampler must be one of"),
    ],
)
def test_bad_input(d, cli, tmp_path, case, match):
    bad = _bad_files(d / "manifold.safetensors", tmp_path)
    ckpt, data, extra = d / "manifold.safetensors", d / "m5", ["--steps", 2]
    if case == "other_channel":
        ckpt, data = d / "digits.safetensors", d / "blur"
    elif case == "other_shape":
        data = d / "m3"
    elif case in bad:
        ckpt = bad[case]
    elif case == "missing":
        ckpt = tmp_path / "nope.safetensors"
    elif case == "missing_data":
        data = tmp_path / "nope"
    elif case == "data_folder_as_checkpoint":
        ckpt = d / "m5"
    elif case == "checkpoint_as_data":
        data = d / "manifold.safetensors"
    elif case == "zero_per_observation":
        extra = ["--per-observation", 0]
    elif case == "zero_steps":
        extra = ["--steps", 0]
    elif case == "unknown_sampler":
        extra = ["--sampler", "euler"]
    out = tmp_path / "out"
    png = ["--png", tmp_path / "png"] if data.name in ("mask", "blur") else []
    code, _, err = cli("reconstruct", ckpt, data, out, *extra, *png)
    assert code == 2
    assert match in error_line(err), err
    assert not out.exists() and not (tmp_path / "png").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_an_unconditional_prior_reconstructs_by_mmps(d, cli, tmp_path):
    code, _, err = cli(
        "reconstruct", d / "urun/checkpoints/uncond.safetensors", d / "mask", tmp_path / "r", "--steps", 3
    )
    assert code == 0, err
    x = read_x(tmp_path / "r")
    assert x.shape == (40, 1, 8, 8) and torch.isfinite(x).all()
    assert read_manifest(tmp_path / "r")["method"] == "em-mmps"


@pytest.mark.parametrize("existing", ["out", "png"])
def test_existing_output_needs_force(d, cli, tmp_path, existing):
    out, png = tmp_path / "out", tmp_path / "png"
    target = out if existing == "out" else png
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    code, _, err = cli("reconstruct", d / "digits.safetensors", d / "mask", out, "--steps", 2, "--png", png)
    assert code == 2 and "already exists" in error_line(err) and "--force" in error_line(err)
    assert file_bytes(target) == {"keep.txt": b"mine"}
    assert not (png if existing == "out" else out).exists()


def test_png_grids_hold_64_images_of_one_draw_each(tmp_path):
    """``--png``'s grids: up to 64 images, never two draws in one, named by first and last index
    and draw (names ``--force`` recognises as diffem's), the tiles' single-file names in a PNG text
    chunk; a folder of grids is replaced by single files and back."""
    import json

    from PIL import Image

    from diffem_cli.io.store import PNG_ENTRY, foreign_output
    from diffem_cli.pipeline.reconstruct import png_name, write_png_grids, write_pngs

    n = 70
    x = torch.rand(2 * n, 1, 8, 8) * 2 - 1
    index, draws = list(range(n)) * 2, [0] * n + [1] * n
    names = [png_name(i, r, "cats/tom.png" if i == 3 else None) for i, r in zip(index, draws, strict=True)]
    data = {"kind": "image", "value_range": [-1.0, 1.0]}
    write_png_grids(tmp_path / "png", x, index, draws, names, data, force=False)
    grids = sorted(p.name for p in (tmp_path / "png").iterdir())
    assert grids == [
        "000000_000063_draw0.png",
        "000000_000063_draw1.png",
        "000064_000069_draw0.png",
        "000064_000069_draw1.png",
    ]
    assert all(PNG_ENTRY.match(g) for g in grids) and foreign_output(tmp_path / "png") is None
    with Image.open(tmp_path / "png" / grids[0]) as img:
        tiles = json.loads(img.text["diffem:tiles"])
        assert img.size[0] >= 8 * 64 and img.size[1] >= 8 * 64  # 8 x 8 tiles of at least 64 px
    assert len(tiles) == 64 and tiles[3] == "000003_0_cats-tom" and tiles[0] == "000000_0"
    with Image.open(tmp_path / "png" / grids[3]) as img:
        assert json.loads(img.text["diffem:tiles"]) == [f"{i:06d}_1" for i in range(64, 70)]
    write_pngs(tmp_path / "png", x, names, data, force=True)  # --png-single over grids
    assert len(list((tmp_path / "png").iterdir())) == 2 * n
    write_png_grids(tmp_path / "png", x, index, draws, names, data, force=True)
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == grids


def test_png_single_needs_png(d, cli, tmp_path):
    code, _, err = cli("reconstruct", d / "digits.safetensors", d / "mask", tmp_path / "r", "--png-single")
    assert code == 2 and "--png-single needs --png" in error_line(err)
    assert not (tmp_path / "r").exists()
