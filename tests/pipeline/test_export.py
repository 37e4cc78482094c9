"""``export``: an unconditional image model samples in ``diffusers.DDPMPipeline``; exported conditional
and vector models load back into ``reconstruct`` / ``sample`` and give exactly the same outputs, with
every auxiliary tensor (EM-MMPS's Gaussian moments) kept."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import FAST, TINY_MLP, TINY_UNET, error_line, fast_em_lap, fast_uncond, read_x, run_ok, sets

from diffem_cli.core.errors import DiffemError
from diffem_cli.diffusion.checkpoint import CHECKSUM_KEY, load_checkpoint, save_tensors
from diffem_cli.pipeline.export import AUX_FILE, CHECKSUMS_KEY, load_export


@pytest.fixture(scope="module")
def d(tmp_path_factory) -> Path:
    """Conditional and unconditional checkpoints for digits (UNet) and the manifold (MLP), exported."""
    root = tmp_path_factory.mktemp("export")
    run_ok(
        "corrupt", "digits", root / "dobs", "--channel", "mask", "--limit", 32, "--clean-out", root / "dclean"
    )
    fast_em_lap(root / "dobs", root / "drun", "--set", "em.init=observation", *TINY_UNET)
    fast_uncond(root / "dclean", root / "durun", *TINY_UNET)
    run_ok(
        "corrupt",
        "manifold:samples=64",
        root / "mobs",
        "--channel",
        "projection",
        "--clean-out",
        root / "mclean",
    )
    fast_em_lap(root / "mobs", root / "mrun", *TINY_MLP)
    fast_uncond(root / "mclean", root / "murun", *TINY_MLP)
    for name, ckpt in [
        ("d_uncond", "durun/checkpoints/uncond.safetensors"),
        ("d_cond", "drun/checkpoints/lap_001.safetensors"),
        ("m_uncond", "murun/checkpoints/uncond.safetensors"),
        ("m_cond", "mrun/checkpoints/lap_001.safetensors"),
    ]:
        shutil.copy(root / ckpt, root / f"{name}.safetensors")
        run_ok("export", root / f"{name}.safetensors", root / f"{name}_exp")
    return root


def test_unconditional_image_export_runs_in_ddpm_pipeline(d):
    from diffusers import DDPMPipeline

    folder = d / "d_uncond_exp"
    assert {"model_index.json", "unet", "scheduler", "README.md", "diffem.json"} <= {
        p.name for p in folder.iterdir()
    }
    pipe = DDPMPipeline.from_pretrained(str(folder))
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    assert pipe.unet.config.in_channels == 1 and pipe.unet.config.sample_size == 8
    # the pipeline's UNet is the checkpoint's EMA UNet, weight for weight
    tensors = load_checkpoint(d / "d_uncond.safetensors").tensors
    for name, value in pipe.unet.state_dict().items():
        assert torch.equal(value, tensors[f"unet.{name}"]), name
    images = pipe(
        batch_size=3, num_inference_steps=4, output_type="np", generator=torch.Generator().manual_seed(0)
    ).images
    assert images.shape == (3, 8, 8, 1) and np.isfinite(images).all()
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 0
    pil = pipe(batch_size=2, num_inference_steps=2).images
    assert len(pil) == 2 and pil[0].size == (8, 8)
    card = (folder / "README.md").read_text()
    assert "DDPMPipeline.from_pretrained" in card and "library_name: diffusers" in card
    # trailing spacing: a 50-step pipeline starts from the last training timestep, t = 999
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    pipe.scheduler.set_timesteps(50)
    assert int(pipe.scheduler.timesteps[0]) == 999 and int(pipe.scheduler.timesteps[-1]) == 19


def test_model_cards_carry_provenance(d):
    cond = (d / "d_cond_exp" / "README.md").read_text()
    assert "corruption channel: mask with parameters" in cond and "EM laps: lap 1" in cond
    fingerprint = load_checkpoint(d / "d_cond.safetensors").meta["data"]["fingerprint"]
    assert f"data fingerprint: {fingerprint}" in cond and "data source: digits (32 samples)" in cond
    # a vector model is not tagged as a diffusers image model
    vec = (d / "m_cond_exp" / "README.md").read_text()
    assert (
        "library_name: diffusers" not in vec and "vector-data" in vec and "image" not in vec.split("---")[1]
    )
    assert "corruption channel: projection" in vec and "None" not in vec
    meta = json.loads((d / "m_cond_exp" / "diffem.json").read_text())
    steps = meta["provenance"]  # the chain: the checkpoint's, then the export
    assert [s["command"] for s in steps] == ["corrupt", "em-train", "export"] and steps[1]["laps"] == 1
    assert steps[0]["channel"]["name"] == "projection" and steps[1]["method"] == "diffem"


def test_exported_files_follow_the_umask(d):
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    want = 0o666 & ~mask
    for folder in ("d_uncond_exp", "m_cond_exp"):
        files = [p for p in (d / folder).rglob("*") if p.is_file()]
        assert any(p.suffix == ".safetensors" for p in files)
        for p in files:
            assert p.stat().st_mode & 0o777 == want, (p, oct(p.stat().st_mode))
    assert (d / "d_uncond.safetensors").stat().st_mode & 0o777 == want


def test_exported_image_models_load_back(d, cli, tmp_path):
    # conditional: reconstruct from the folder == reconstruct from the checkpoint
    for src, name in [(d / "d_cond.safetensors", "a"), (d / "d_cond_exp", "b")]:
        code, _, err = cli("reconstruct", src, d / "dobs", tmp_path / name, "--steps", 3)
        assert code == 0, err
    assert torch.equal(read_x(tmp_path / "a"), read_x(tmp_path / "b"))
    meta = json.loads((d / "d_cond_exp/diffem.json").read_text())
    assert meta["kind"] == "conditional" and meta["channel"]["name"] == "mask" and meta["cond_size"] == 2 + 1
    assert (d / "d_cond_exp/unet/config.json").exists() and not (d / "d_cond_exp/model_index.json").exists()
    assert "mask" in (d / "d_cond_exp/README.md").read_text()
    # unconditional: sample from the pipeline folder == sample from the checkpoint
    for src, name in [(d / "d_uncond.safetensors", "c"), (d / "d_uncond_exp", "e")]:
        code, _, err = cli("sample", src, tmp_path / name, "-n", 5, "--steps", 3)
        assert code == 0, err
    assert torch.equal(read_x(tmp_path / "c"), read_x(tmp_path / "e"))


def test_exported_vector_models_load_back(d, cli, tmp_path):
    assert {p.name for p in (d / "m_cond_exp").iterdir()} == {"model.safetensors", "diffem.json", "README.md"}
    for src, name in [(d / "m_uncond.safetensors", "a"), (d / "m_uncond_exp", "b")]:
        code, _, err = cli("sample", src, tmp_path / name, "-n", 40, "--steps", 4)
        assert code == 0, err
    a = read_x(tmp_path / "a")
    assert a.shape == (40, 5) and torch.equal(a, read_x(tmp_path / "b"))
    for src, name in [(d / "m_cond.safetensors", "c"), (d / "m_cond_exp", "e")]:
        code, _, err = cli("reconstruct", src, d / "mobs", tmp_path / name, "--steps", 4)
        assert code == 0, err
    c = read_x(tmp_path / "c")
    assert c.shape == (64, 5) and torch.equal(c, read_x(tmp_path / "e"))


def test_export_refusals(d, cli, tmp_path):
    good = d / "m_cond.safetensors"
    raw = good.read_bytes()
    (tmp_path / "half.safetensors").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "noise.safetensors").write_bytes(bytes(range(256)) * 8)
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(tmp_path / "foreign.safetensors"))
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    cases = [
        (("export", tmp_path / "half.safetensors", out), "not a readable safetensors file"),
        (("export", tmp_path / "noise.safetensors", out), "not a readable safetensors file"),
        (("export", tmp_path / "foreign.safetensors", out), "not a diffem checkpoint"),
        (("export", tmp_path / "missing.safetensors", out), "does not exist"),
        (("export", d / "m_cond_exp", out), "is a folder"),
        (("export", good, tmp_path / "no" / "out"), "does not exist"),
        (("sample", d / "m_cond_exp", out), "conditional model"),
        (("sample", d / "mobs", out), "not a model folder written by 'diffem export'"),
        (("sample", tmp_path / "empty", out), "without diffem.json"),
        (("export", good, good), "is the input"),
        (("sample", d / "m_uncond_exp", d / "m_uncond_exp" / "samples"), "lies inside the input"),
    ]
    for argv, match in cases:
        code, _, err = cli(*argv)
        assert code == 2, argv
        assert match in error_line(err), (argv, err)
        assert not out.exists()
    # an export folder whose weights went missing
    broken = tmp_path / "broken"
    shutil.copytree(d / "d_cond_exp", broken)
    shutil.rmtree(broken / "unet")
    code, _, err = cli("reconstruct", broken, d / "dobs", out)
    assert code == 2 and "cannot be loaded" in error_line(err) and not out.exists()
    # existing OUT: untouched without --force; with it, replaced only if diffem wrote it
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = cli("export", good, out)
    assert code == 2 and "already exists" in error_line(err)
    code, _, err = cli("export", good, out, "--force")
    assert code == 2 and "diffem did not write (keep.txt)" in error_line(err)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()
    for _ in range(2):  # an empty folder, then an export of diffem's
        code, _, err = cli("export", good, out, "--force")
        assert code == 0, err
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "diffem.json", "README.md"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _same_checkpoint(back, ckpt) -> None:
    """``back`` (loaded from an export) holds ``ckpt``'s tensors bit for bit and its metadata."""
    assert set(back.tensors) == set(ckpt.tensors)
    for name, value in ckpt.tensors.items():
        assert torch.equal(back.tensors[name], value), name
    assert {k: v for k, v in back.meta.items() if k != "provenance"} == {
        k: v for k, v in ckpt.meta.items() if k != "provenance"
    }
    # the export's chain is the checkpoint's and the export step (none before chains existed)
    assert back.meta["provenance"][:-1] == ckpt.meta.get("provenance", [])
    assert back.meta["provenance"][-1]["command"] == "export"


@pytest.fixture(scope="module")
def mmps(tmp_path_factory) -> Path:
    """A one-lap EM-MMPS manifold checkpoint with Gaussian moments (mmps.covariance=gaussian), exported."""
    root = tmp_path_factory.mktemp("export_mmps")
    run_ok("corrupt", "manifold:samples=64", root / "obs", "--channel", "projection")
    run_ok(
        "em-train",
        root / "obs",
        root / "run",
        "--laps",
        1,
        "--method",
        "em-mmps",
        *FAST,
        *TINY_MLP,
        *sets("mmps.covariance=gaussian", "em.drop_outside=0"),
    )
    run_ok("export", root / "run/checkpoints/lap_001.safetensors", root / "exp")
    return root


def test_export_keeps_the_gaussian_moments(mmps, cli, tmp_path, monkeypatch):
    ckpt_path = mmps / "run/checkpoints/lap_001.safetensors"
    ckpt = load_checkpoint(ckpt_path)
    assert {"moments.mean", "moments.cov"} <= set(ckpt.aux)
    folder = mmps / "exp"
    assert {p.name for p in folder.iterdir()} == {"model.safetensors", AUX_FILE, "diffem.json", "README.md"}
    assert "moments.cov" in (folder / "README.md").read_text()
    _same_checkpoint(load_export(folder), ckpt)
    # posterior samples from the export are those from the checkpoint, bit for bit (same seed)
    for src, name in [(ckpt_path, "a"), (folder, "b")]:
        code, _, err = cli("reconstruct", src, mmps / "obs", tmp_path / name, "--steps", 3)
        assert code == 0, err
    a = read_x(tmp_path / "a")
    assert a.shape == (64, 5) and torch.equal(a, read_x(tmp_path / "b"))
    # the moments matter: an export stripped of them (the old behaviour, trusted) samples otherwise
    stripped = tmp_path / "stripped"
    shutil.copytree(folder, stripped)
    (stripped / AUX_FILE).unlink()
    meta = json.loads((stripped / "diffem.json").read_text())
    del meta[CHECKSUMS_KEY], meta[CHECKSUM_KEY]
    (stripped / "diffem.json").write_text(json.dumps(meta))
    monkeypatch.setenv("DIFFEM_TRUST_UNVERIFIED", "1")
    assert load_export(stripped).aux == {}
    code, _, err = cli("reconstruct", stripped, mmps / "obs", tmp_path / "c", "--steps", 3)
    assert code == 0, err
    assert not torch.equal(a, read_x(tmp_path / "c"))


def test_export_checksums_are_verified(mmps, d, tmp_path, monkeypatch):
    folder = tmp_path / "exp"
    shutil.copytree(mmps / "exp", folder)
    (folder / AUX_FILE).unlink()  # the aux file the checksums promise went missing
    with pytest.raises(DiffemError, match="does not exist"):
        load_export(folder)
    # weights replaced by other valid weights: the recorded checksum catches it
    shutil.copytree(mmps / "exp", folder, dirs_exist_ok=True)
    from safetensors.torch import load_file, save_file

    weights = load_file(str(folder / "model.safetensors"))
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(DiffemError, match="checksum mismatch"):
        load_export(folder)
    # exports written before checksums were recorded (or with them removed) load only when trusted
    old = tmp_path / "old"
    shutil.copytree(d / "m_cond_exp", old)
    meta = json.loads((old / "diffem.json").read_text())
    assert set(meta.pop(CHECKSUMS_KEY)) == {"model.safetensors"} and meta.pop(CHECKSUM_KEY)
    (old / "diffem.json").write_text(json.dumps(meta))
    with pytest.raises(DiffemError, match="carries no checksum"):
        load_export(old)
    monkeypatch.setenv("DIFFEM_TRUST_UNVERIFIED", "1")
    _same_checkpoint(load_export(old), load_checkpoint(d / "m_cond.safetensors"))


@pytest.mark.parametrize(
    "tamper",
    [
        lambda meta: meta["data"].update(value_range=[-9, 9]),  # another clipping, same weights
        lambda meta: meta[CHECKSUMS_KEY].pop("model.safetensors"),  # a file no longer verified
        lambda meta: meta.update({CHECKSUM_KEY: "sha256:" + "0" * 64}),
    ],
    ids=["channel", "file-checksum", "checksum"],
)
def test_a_tampered_export_is_refused_with_one_line(d, cli, tmp_path, tamper):
    """An edit of diffem.json (which says how to use the weights) is caught like one of the weights,
    with trust or without: only a missing checksum can be trusted."""
    folder = tmp_path / "exp"
    shutil.copytree(d / "m_cond_exp", folder)
    meta = json.loads((folder / "diffem.json").read_text())
    tamper(meta)
    (folder / "diffem.json").write_text(json.dumps(meta))
    out = tmp_path / "out"
    code, _, err = cli("reconstruct", folder, d / "mobs", out, "--steps", 2)
    assert code == 2 and "diffem.json: checksum mismatch" in error_line(err) and not out.exists()


def test_exports_without_aux_tensors_have_no_aux_file(d):
    for name in ("d_uncond", "m_uncond", "m_cond"):
        assert not (d / f"{name}_exp" / AUX_FILE).exists()
        _same_checkpoint(load_export(d / f"{name}_exp"), load_checkpoint(d / f"{name}.safetensors"))
    # a conditional image model holds its Gaussian conditioning feature's moments (cond.gaussian_mean)
    assert (d / "d_cond_exp" / AUX_FILE).exists()
    _same_checkpoint(load_export(d / "d_cond_exp"), load_checkpoint(d / "d_cond.safetensors"))


def test_pipeline_export_with_aux_tensors_still_loads_in_diffusers(d, tmp_path):
    from diffusers import DDPMPipeline

    ckpt = load_checkpoint(d / "d_uncond.safetensors")
    aux = {"aux.moments.mean": torch.linspace(-1, 1, 64, dtype=torch.float64)}
    save_tensors(tmp_path / "aux.safetensors", {**ckpt.tensors, **aux}, ckpt.meta)
    run_ok("export", tmp_path / "aux.safetensors", tmp_path / "exp")
    assert (tmp_path / "exp" / AUX_FILE).is_file() and (tmp_path / "exp" / "model_index.json").is_file()
    back = load_export(tmp_path / "exp")
    _same_checkpoint(back, load_checkpoint(tmp_path / "aux.safetensors"))
    assert back.aux["moments.mean"].dtype == torch.float64
    pipe = DDPMPipeline.from_pretrained(str(tmp_path / "exp"))
    for name, value in pipe.unet.state_dict().items():
        assert torch.equal(value, ckpt.tensors[f"unet.{name}"]), name
