"""Bad inputs a new user tries: each is one ``error:`` line, exit 2, and nothing written or overwritten."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from helpers import FAST, TINY_MLP, cut_network, error_line, file_bytes, run_ok, snapshot

from diffem_cli.core.errors import DiffemError


@pytest.fixture(scope="module")
def d(tmp_path_factory) -> Path:
    """Manifold observations with their clean data, one finished tiny EM lap, and digits clean data."""
    root = tmp_path_factory.mktemp("bad")
    run_ok("corrupt", "manifold:samples=64", root / "obs", "-c", "projection", "--clean-out", root / "clean")
    run_ok("em-train", root / "obs", root / "run", "--laps", 1, *FAST, *TINY_MLP)
    run_ok("corrupt", "digits", root / "dobs", "-c", "mask", "--limit", 16, "--clean-out", root / "dclean")
    return root


def _refused(cli, argv, match: str, untouched: list[Path]) -> None:
    before = {p: snapshot(p) if p.is_dir() else (p.read_bytes() if p.exists() else None) for p in untouched}
    code, _, err = cli(*argv)
    assert code == 2, (argv, err)
    assert match in error_line(err), (argv, err)
    after = {p: snapshot(p) if p.is_dir() else (p.read_bytes() if p.exists() else None) for p in untouched}
    assert before == after, argv


def test_outputs_never_overlap_inputs(cli, d: Path, tmp_path: Path) -> None:
    obs, clean, run, ckpt = d / "obs", d / "clean", d / "run", d / "run/checkpoints/lap_001.safetensors"
    cases = [
        (("corrupt", clean, clean, "-c", "noise", "--force"), "is the input", [clean]),
        (("corrupt", clean, clean / "sub", "-c", "noise"), "lies inside the input", [clean]),
        (("corrupt", clean, d, "-c", "noise", "--force"), "contains the input", [clean]),
        (
            ("corrupt", "digits", tmp_path / "o", "-c", "mask", "--clean-out", tmp_path / "o"),
            "must all differ",
            [],
        ),
        (("em-train", obs, obs, *TINY_MLP), "is the input", [obs]),
        (("em-train", obs, run, "--eval-clean", run, *TINY_MLP), "is the input", [run]),
        (("reconstruct", ckpt, obs, obs, "--force"), "is the input", [obs]),
        (("reconstruct", ckpt, obs, run / "checkpoints", "--force"), "contains the input", [run]),
        (("reconstruct", ckpt, obs, tmp_path / "r", "--png", obs / "png"), "lies inside the input", [obs]),
        (("train-uncond", clean, clean, *TINY_MLP), "is the input", [clean]),
        (("sample", ckpt, run, "--force"), "contains the input", [run]),
        (("export", ckpt, run / "checkpoints", "--force"), "contains the input", [run]),
        (("evaluate", clean, "--reference", clean, "--json", clean / "m.json"), "lies inside", [clean]),
    ]
    for argv, match, untouched in cases:
        _refused(cli, argv, match, untouched)


def test_bad_values_are_refused_before_anything_is_written(cli, d: Path, tmp_path: Path) -> None:
    obs, ckpt = d / "obs", d / "run/checkpoints/lap_001.safetensors"
    new = tmp_path / "new"
    cases = [
        (("em-train", obs, new, "--set", "train.epochs=0"), "'train.epochs'"),
        (("em-train", obs, new, "--set", "train.ema_decay=2"), "'train.ema_decay'"),
        (("em-train", obs, new, "--set", "sample.sampler=euler"), "'sample.sampler'"),
        (("em-train", obs, new, "--config", "digits"), "needs images"),
        (("em-train", obs, new, "--set", "eval.metrics=psnr"), "needs images"),
        (("em-train", obs, new, "--laps", "-1"), "--laps must be >= 0"),
        (("train-uncond", d / "clean", new, "--set", "train.batch_size=0"), "'train.batch_size'"),
        (("train-uncond", d / "clean", new, "--config", "digits"), "needs images"),
        (("reconstruct", ckpt, obs, new, "--batch-size", "0"), "--batch-size must be an integer >= 1"),
        (("reconstruct", ckpt, obs, new, "--steps", "0"), "--steps must be an integer in [1, 1000]"),
        (("reconstruct", ckpt, obs, new, "--sampler", "euler"), "--sampler must be one of dpm++, ddim, ddpm"),
        (("reconstruct", ckpt, obs, new, "--per-observation", "0"), "--per-observation"),
        (("sample", ckpt, new, "-n", "0"), "-n must be >= 1"),
        (("sample", ckpt, new, "--steps", "2000"), "--steps"),
    ]
    for argv, match in cases:
        code, _, err = cli(*argv)
        assert code == 2 and match in error_line(err), (argv, err)
        assert not new.exists(), argv
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_metrics_are_checked_against_the_data_kind(cli, d: Path, tmp_path: Path) -> None:
    """eval.metrics names are checked at load time; a metric for images on vectors before lap 0."""
    code, _, err = cli(
        "em-train", d / "obs", tmp_path / "r", "--eval-clean", d / "clean", "--set", "eval.metrics=bogus"
    )
    assert code == 2 and "'eval.metrics'" in error_line(err) and not (tmp_path / "r").exists()


def test_run_given_as_a_file(cli, d: Path, tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("not a run")
    for argv in [
        ("em-train", d / "obs", f, *TINY_MLP),
        ("train-uncond", d / "clean", f, *TINY_MLP),
        ("report", f),
        ("em-train", f, tmp_path / "r"),
    ]:
        code, _, err = cli(*argv)
        assert code == 2, argv
        assert "file" in error_line(err) or "not a" in error_line(err), err
    assert f.read_text() == "not a run"


def test_manifest_disagreeing_with_its_data(cli, d: Path, tmp_path: Path) -> None:
    import shutil

    bad = tmp_path / "obs"
    shutil.copytree(d / "obs", bad)
    manifest = json.loads((bad / "diffem.json").read_text())
    manifest["data_shape"] = [7]
    (bad / "diffem.json").write_text(json.dumps(manifest))
    for argv in [
        ("em-train", bad, tmp_path / "run", *TINY_MLP),
        ("reconstruct", d / "run/checkpoints/lap_001.safetensors", bad, tmp_path / "rec"),
    ]:
        code, _, err = cli(*argv)
        assert code == 2 and "data_shape [7]" in error_line(err), err
    assert not (tmp_path / "run").exists() and not (tmp_path / "rec").exists()
    manifest["data_shape"], manifest["data_kind"] = [1, 8, 8], "image"
    (bad / "diffem.json").write_text(json.dumps(manifest))
    code, _, err = cli("em-train", bad, tmp_path / "run", *TINY_MLP)
    assert code == 2 and "does not fit its channel" in error_line(err) and not (tmp_path / "run").exists()


def test_check_manifest_columns_directly(d: Path) -> None:
    from diffem_cli.io.store import check_manifest_columns, read_dataset

    for folder in ("obs", "clean", "dobs", "dclean"):
        ds, manifest = read_dataset(d / folder)
        check_manifest_columns(ds, manifest, d / folder)
    ds, manifest = read_dataset(d / "dclean")
    with pytest.raises(DiffemError, match="disagrees with the column x"):
        check_manifest_columns(ds, {**manifest, "data_shape": [1, 4, 4]}, d / "dclean")
    with pytest.raises(DiffemError, match="data_kind 'vector' disagrees"):
        check_manifest_columns(ds, {**manifest, "data_kind": "vector"}, d / "dclean")
    ds, manifest = read_dataset(d / "dobs")
    with pytest.raises(DiffemError, match="rows of shape"):
        check_manifest_columns(ds, {**manifest, "data_shape": [1, 4, 4]}, d / "dobs")
    with pytest.raises(DiffemError, match="says 99 rows"):
        check_manifest_columns(ds, {**manifest, "num_rows": 99}, d / "dobs")


def test_report_with_a_reference_of_another_shape_writes_nothing(cli, d: Path) -> None:
    run = d / "run"
    before = snapshot(run)
    code, _, err = cli("report", run, "--clean", d / "dclean")
    assert code == 2 and "shape" in error_line(err)
    assert snapshot(run) == before and not (run / "report.json").exists()


def test_hub_unreachable_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    from diffem_cli.io import sources

    tried = cut_network(monkeypatch)
    with pytest.raises(DiffemError, match="no connection to the Hugging Face Hub"):
        sources.load_source("hf:someone/something")
    # one probe, bounded by the short timeout: no retries, no library-level download attempt
    assert tried == [(("huggingface.co", 443), sources.HUB_TIMEOUT_S)]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline mode: datasets reads its cache, no probe
    assert sources.hub_reachable() and len(tried) == 1


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_safetensors_follow_the_umask(tmp_path: Path, mask: int) -> None:
    from diffem_cli.diffusion.checkpoint import save_tensors

    old = os.umask(mask)
    try:
        save_tensors(tmp_path / "t.safetensors", {"w": torch.ones(3)}, {"kind": "test"})
    finally:
        os.umask(old)
    assert (tmp_path / "t.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask


def test_corrupt_refusals_leave_the_source_byte_identical(cli, d: Path) -> None:
    before = file_bytes(d / "clean")
    code, _, err = cli("corrupt", d / "clean", d / "clean", "-c", "noise", "--force")
    assert code == 2 and "is the input" in error_line(err)
    assert file_bytes(d / "clean") == before


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_is_one_line_and_exit_2(
    cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """A write the file system refuses outside diffem's own writers (here matplotlib's, saving a
    figure) is still one line naming the file, exit 2."""
    from matplotlib.figure import Figure

    def full(self, fname, **kwargs):
        raise OSError(code, os.strerror(code), str(fname))

    monkeypatch.setattr(Figure, "savefig", full)
    preview = tmp_path / "p.png"
    status, _, err = cli(
        "corrupt", "digits", tmp_path / "obs", "-c", "mask", "--limit", 4, "--preview", preview
    )
    assert status == 2
    line = error_line(err)
    assert str(tmp_path) in line and os.strerror(code) in line and not preview.exists()
