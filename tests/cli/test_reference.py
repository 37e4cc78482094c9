"""The generated references (docs/cli.md, docs/config.md) match the code, and are rendered from it."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path
from typing import Annotated, Any

import pytest
import typer

from diffem_cli.cli import reference
from diffem_cli.config.run import RunConfig

ROOT = Path(__file__).resolve().parents[2]


def _results_index():
    """``bench/results_index.py`` as a module (``bench`` is not an installed package)."""
    spec = importlib.util.spec_from_file_location("results_index", ROOT / "bench" / "results_index.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("page", sorted(reference.pages(), key=str), ids=str)
def test_committed_page_is_current(page):
    committed = ROOT / page
    assert committed.is_file(), f"{page} is missing: run `make docs`"
    assert committed.read_text() == reference.pages()[page], f"{page} is stale: run `make docs`"


def test_every_command_option_and_config_key_is_documented():
    from diffem_cli.cli.app import app

    cli = reference.render_cli()
    root = typer.main.get_command(app)

    def walk(command: Any, path: str) -> None:
        assert f"`{path}`" in cli, path
        for param in command.params:
            names = [param.metavar or param.name.upper()] if not param.opts[0].startswith("-") else param.opts
            assert all(f"`{n}`" in cli for n in names), (path, names)
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, f"{path} {name}")

    walk(root, "diffem")
    config, _ = reference.default_config()
    text = reference.render_config()
    sections = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    sections.update(getattr(config, "options", {}))  # method option sections read as top-level ones
    sections.pop("options", None)
    for name, value in sections.items():
        assert f"`{name}`" in text, name
        if dataclasses.is_dataclass(value):
            for key in dataclasses.fields(value):
                assert f"| `{key.name}` |" in text, (name, key.name)


def test_render_follows_the_app_it_is_given():
    """A command added to an app appears with its arguments, defaults and help: nothing is hard-coded."""
    app = typer.Typer(add_completion=False)

    @app.command("grow")
    def grow(
        path: Annotated[str, typer.Argument(help="Where to grow.")],
        rate: Annotated[float, typer.Option("--rate", help="How fast | how far.")] = 0.5,
        loud: Annotated[bool, typer.Option("--loud/--quiet", help="Shout.")] = False,
    ) -> None:
        """Grow something."""

    @app.command("prune")
    def prune() -> None:
        """Prune it."""

    text = reference.render_cli(app)
    assert "## `diffem grow`" in text and "## `diffem prune`" in text
    assert "diffem grow PATH [OPTIONS]" in text
    assert "| `--rate` | float | `0.5` | How fast \\| how far. |" in text  # pipes escaped in cells
    assert "| `--loud`, `--quiet` | flag | `--quiet` | Shout. |" in text


def test_config_page_renders_any_run_config_and_every_preset():
    cfg = RunConfig()
    cfg.train.epochs = 7
    text = reference.render_config(cfg)
    assert "| `epochs` | `int` | `7` |" in text
    presets = sorted(p.stem for p in (ROOT / "diffem_cli" / "config" / "presets").glob("*.yaml"))
    assert presets and all(f"### `{name}`" in text for name in presets)


def test_output_has_no_absolute_paths():
    for text in reference.pages().values():
        assert str(ROOT) not in text and "/home/" not in text and "/tmp/" not in text


def test_results_index_is_current():
    index = _results_index()
    committed = (ROOT / "bench" / "results" / "README.md").read_text()
    assert committed == index.render(), "bench/results/README.md is stale: run `make docs`"


def test_results_index_says_not_recorded_rather_than_inventing(tmp_path):
    index = _results_index()
    (tmp_path / "alpha.json").write_text(json.dumps({"rows": [{"case": "a", "wall_s": 1.5}]}))
    (tmp_path / "alpha.md").write_text("# alpha\n")
    stamped = {"date": "2026-01-02", "commit": "abc1234", "machine": {"summary": "a CPU"}, "load": [1.0]}
    (tmp_path / "beta.json").write_text(
        json.dumps({**stamped, "runs": {"m": {"sinkhorn_by_lap": [2.0, 0.5]}}})
    )
    text = index.render(tmp_path)
    alpha, beta = text.split("## [alpha](alpha.md)")[1].split("## beta")
    assert alpha.count("not recorded") == 4 and "| 1 | a | 1.5 |" in alpha
    assert "Date: 2026-01-02; commit: abc1234; machine: a CPU; load average: 1" in beta
    assert "- m: 2 -> 0.5 over 1 laps" in beta
