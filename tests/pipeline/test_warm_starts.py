"""Warm starts from every kind of checkpoint (conditional, unconditional prior, Ambient) into a
method of every kind: each works, or is refused in one line before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import FAST, TINY_UNET, error_line, run_ok, sets

from diffem_cli.diffusion.checkpoint import load_checkpoint
from diffem_cli.methods import method_classes
from diffem_cli.pipeline.runs import Run

SETTINGS = [*FAST, *TINY_UNET, *sets("sample.steps=2")]
SOURCES = ("diffem", "em-mmps", "ambient")
"""One method per kind of model it trains: conditional, unconditional, ambient."""


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("warm")
    run_ok("corrupt", "digits", root / "obs", "-c", "mask", "-p", "rho=0.5", "--limit", 16)
    out = {"obs": root / "obs"}
    for name in SOURCES:
        run_ok("em-train", root / "obs", root / name, "--laps", 1, "--method", name, *SETTINGS)
        out[name] = root / name / "checkpoints" / "lap_001.safetensors"
    return out


def test_the_sources_cover_every_kind_of_model(ckpts) -> None:
    kinds = {cls.kind for cls in method_classes().values()}
    assert {load_checkpoint(ckpts[name]).kind for name in SOURCES} == kinds


@pytest.mark.parametrize("method", SOURCES)
def test_every_kind_warm_starts_every_kind(ckpts, cli, tmp_path: Path, method: str) -> None:
    for source in SOURCES:
        run = tmp_path / f"{source}-to-{method}"
        code, _, err = cli(
            "em-train",
            ckpts["obs"],
            run,
            "--laps",
            1,
            "--method",
            method,
            "--warm-start",
            ckpts[source],
            *SETTINGS,
        )
        assert code == 0, (source, method, err)
        records = Run(run).lap_records()
        assert records[0]["init"] == "warm-start" and sorted(records) == [0, 1]


def test_a_refused_warm_start_writes_nothing(ckpts, cli, tmp_path: Path) -> None:
    # ambient-tweedie serves the noise channel only: refused before the RUN exists
    code, _, err = cli(
        "em-train",
        ckpts["obs"],
        tmp_path / "run",
        "--method",
        "ambient-tweedie",
        "--warm-start",
        ckpts["ambient"],
    )
    assert code == 2 and "ambient-tweedie" in error_line(err)
    assert list(tmp_path.iterdir()) == []
