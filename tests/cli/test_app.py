"""Usage mistakes on every subcommand: one line on stderr, exit 2, no traceback; --version; bare
diffem; help that loads no heavy module, renders flags as flags and names every preset; ``python -m
diffem_cli`` never imports from the working directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from diffem_cli import __version__
from diffem_cli.cli.app import app


def _commands() -> list[tuple[list[str], object]]:
    """Every leaf command as (argv prefix, click command), nested groups (``config show``) included."""
    import typer.main

    root = typer.main.get_command(app)
    out = []

    def walk(prefix: list[str], group: object) -> None:
        for name, cmd in sorted(group.commands.items()):  # type: ignore[attr-defined]
            if hasattr(cmd, "commands"):
                walk([*prefix, name], cmd)
            else:
                out.append(([*prefix, name], cmd))

    walk([], root)
    return out


COMMANDS = _commands()
NAMES = [" ".join(p) for p, _ in COMMANDS]


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


def test_every_command_is_covered() -> None:
    assert {"corrupt", "em-train", "reconstruct", "train-uncond", "sample", "export", "report"} <= set(NAMES)
    assert {"evaluate", "channels", "config show"} <= set(NAMES)


@pytest.mark.parametrize(("prefix", "command"), COMMANDS, ids=NAMES)
def test_unknown_option(cli, prefix: list[str], command: object) -> None:
    code, out, err = cli(*prefix, "--no-such-option")
    assert code == 2
    line = _one_error_line(err)
    assert "No such option: --no-such-option" in line and f"diffem {' '.join(prefix)}" in line


@pytest.mark.parametrize(("prefix", "command"), COMMANDS, ids=NAMES)
def test_missing_argument(cli, prefix: list[str], command: object) -> None:
    required = [p for p in command.params if getattr(p, "required", False)]  # type: ignore[attr-defined]
    code, out, err = cli(*prefix)
    if not required:  # nothing is required: extra arguments are the mistake to try instead
        code, out, err = cli(*prefix, "a", "b", "c", "d", "e")
    assert code == 2
    line = _one_error_line(err)
    assert "Missing" in line or "unexpected extra argument" in line


@pytest.mark.parametrize(
    "argv",
    [
        ["corrupt", "digits", "out", "--channel", "mask", "--seed", "x"],
        ["sample", "ckpt", "out", "-n", "many"],
        ["reconstruct", "ckpt", "obs", "out", "--steps", "1.5"],
        ["em-train", "obs", "run", "--laps", "two"],
        ["evaluate", "s", "--reference", "r", "--n-points", "x"],
        ["no-such-command"],
        ["export", "a", "b", "c"],
        ["corrupt", "digits", "out", "--channel"],
    ],
)
def test_bad_values_unknown_commands_and_extra_arguments(cli, argv: list[str]) -> None:
    code, out, err = cli(*argv)
    assert code == 2
    _one_error_line(err)


def test_version_and_bare_command(cli) -> None:
    for flag in ("--version", "-V"):
        code, out, err = cli(flag)
        assert code == 0 and out.strip() == f"diffem {__version__}" and not err
    code, out, err = cli()
    assert code == 2 and "Usage" in out and "corrupt" in out and "Traceback" not in out + err
    code, out, err = cli("config")
    assert code == 2 and "show" in out


HEAVY = ("torch", "datasets", "diffusers", "matplotlib", "kornia", "diffem_cli.pipeline")

LOADED = """
import json, runpy, sys
heavy, sys.argv = json.loads(sys.argv[1]), ["diffem", *sys.argv[2:]]
code = None
try:
    runpy.run_module("diffem_cli", run_name="__main__")
except SystemExit as e:
    code = e.code
loaded = sorted(m for m in sys.modules if any(m == h or m.startswith(h + ".") for h in heavy))
sys.stderr.write(json.dumps({"code": code, "heavy": loaded}) + "\\n")
"""


@pytest.mark.parametrize(
    "argv", [["--help"], ["--version"], ["channels"], ["channels", "mask"], ["em-train", "--help"]]
)
def test_help_version_and_channels_load_no_heavy_module(argv: list[str]) -> None:
    """What answers at once (help, version, the channel listing) imports neither torch nor the
    pipeline, in a fresh interpreter run as ``python -m diffem_cli`` runs."""
    proc = subprocess.run(
        [sys.executable, "-c", LOADED, json.dumps(HEAVY), *argv], capture_output=True, text=True, timeout=120
    )
    result = json.loads(proc.stderr.strip().splitlines()[-1])
    assert result == {"code": 0, "heavy": []}, proc.stderr


def test_python_m_ignores_modules_in_the_working_directory(tmp_path: Path) -> None:
    """A ``yaml.py`` (a module ``config show`` imports) planted where diffem runs is never imported."""
    marker = tmp_path / "imported"
    (tmp_path / "yaml.py").write_text(f"open({str(marker)!r}, 'w').close()\nraise SystemExit(9)\n")
    proc = subprocess.run(
        [sys.executable, "-m", "diffem_cli", "config", "show", "manifold"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "network:" in proc.stdout and not marker.exists()


def test_help_renders_flags_and_every_preset(cli) -> None:
    from diffem_cli.config.run import PRESETS

    for argv in (
        ["em-train", "--help"],
        ["compare", "--help"],
        ["train-uncond", "--help"],
        ["corrupt", "--help"],
    ):
        code, out, _ = cli(*argv)
        words = " ".join(out.split())
        assert code == 0 and "<bool>" not in out and "--force " in words and "--no-force" not in words, argv
        if argv[0] != "corrupt":
            assert all(p in words for p in PRESETS), argv
    code, out, _ = cli("methods", "--help")
    assert "--json " in out and "<bool>" not in out


def test_help_names_match_the_registries() -> None:
    """The light help helpers agree with what they stand in for (the presets, the methods' group)."""
    from diffem_cli.cli.commands._help import METHODS_GROUP, preset_names
    from diffem_cli.config.run import PRESETS
    from diffem_cli.methods.registry import GROUP

    assert list(preset_names()) == sorted(PRESETS) and METHODS_GROUP == GROUP


def test_usage_errors_from_the_console_script() -> None:
    """The installed entry point too: a fresh interpreter, exit status 2 and one stderr line."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "diffem_cli", "corrupt", "--bogus"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    _one_error_line(proc.stderr)


def test_verbosity_options_follow_any_command():
    import logging

    from diffem_cli.cli.app import run
    from diffem_cli.core.logs import configure

    try:
        assert run(["channels", "-q"]) == 0
        assert logging.getLogger("diffem").level == logging.WARNING
        assert run(["channels", "--verbose"]) == 0
        assert logging.getLogger("diffem").level == logging.DEBUG
        for argv, cmd in _commands():
            names = {n for p in cmd.params for n in getattr(p, "opts", [])}
            assert {"-v", "--verbose", "-q", "--quiet"} <= names, argv
    finally:
        configure(0)
