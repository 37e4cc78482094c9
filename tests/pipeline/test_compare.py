"""``diffem compare``: several methods on one data set and budget, resumable, with its outputs."""

from __future__ import annotations

import json

import pytest
from helpers import QUICK, TINY_MLP, error_line, run_ok, sets

TRAIN = [*TINY_MLP, *sets("train.batch_size=64", "train.epochs=1"), *QUICK]


def _projections(root, n: int) -> None:
    """``n`` manifold vectors through random projections in ``root/obs``, clean ones in ``root/clean``."""
    run_ok(
        "corrupt",
        f"manifold:samples={n}",
        root / "obs",
        "--channel",
        "projection",
        "--clean-out",
        root / "clean",
    )


def test_compare_runs_every_method_and_resumes(tmp_path, cli):
    _projections(tmp_path, 128)
    argv = [
        "compare",
        tmp_path / "obs",
        tmp_path / "cmp",
        "--methods",
        "diffem,em-mmps,oracle",
        "--eval-clean",
        tmp_path / "clean",
        "--laps",
        1,
        *TRAIN,
    ]
    code, out, err = cli(*argv)
    assert code == 0, err
    summary = json.loads((tmp_path / "cmp/compare.json").read_text())
    assert set(summary["methods"]) == {"diffem", "em-mmps", "oracle"}
    for name, row in summary["methods"].items():
        assert row["seconds"] > 0 and "sinkhorn" in row and "uncond_sinkhorn" in row, name
        assert [r["lap"] for r in summary["laps"][name]] == [0, 1]
    for f in ("compare.md", "compare.png", "compare-samples.png"):
        assert (tmp_path / "cmp" / f).stat().st_size > 0
    assert (tmp_path / "cmp/diffem/uncond/checkpoints/uncond.safetensors").exists()
    before = (tmp_path / "cmp/em-mmps/metrics.jsonl").read_text()
    assert cli(*argv)[0] == 0  # a rerun resumes: nothing is trained again
    assert (tmp_path / "cmp/em-mmps/metrics.jsonl").read_text() == before


def test_compare_refuses_unknown_methods_before_training(tmp_path, cli):
    _projections(tmp_path, 64)
    code, _, err = cli(
        "compare",
        tmp_path / "obs",
        tmp_path / "cmp",
        "--methods",
        "diffem,nope",
        "--eval-clean",
        tmp_path / "clean",
        *TRAIN,
    )
    assert code == 2 and "nope" in error_line(err) and not (tmp_path / "cmp").exists()
    code, _, err = cli(
        "compare",
        tmp_path / "obs",
        tmp_path / "cmp",
        "--methods",
        "naive",
        "--eval-clean",
        tmp_path / "clean",
        *TRAIN,
    )
    assert code == 2 and "naive" in error_line(err) and not (tmp_path / "cmp").exists()


@pytest.mark.slow
def test_compare_all_runs_the_methods_that_fit_the_channel(tmp_path, cli):
    _projections(tmp_path, 64)
    code, out, err = cli(
        "compare",
        tmp_path / "obs",
        tmp_path / "cmp",
        "--methods",
        "all",
        "--eval-clean",
        tmp_path / "clean",
        "--laps",
        1,
        "--no-uncond",
        *TRAIN,
    )
    assert code == 0, err
    summary = json.loads((tmp_path / "cmp/compare.json").read_text())
    # projections: no observation of the data's shape (naive), no mask (ambient), no noise channel
    assert set(summary["methods"]) == {"diffem", "em-mmps", "oracle", "dps-em"}
    for skipped in ("naive", "ambient", "ambient-tweedie"):
        assert f"skipping {skipped}" in out + err
