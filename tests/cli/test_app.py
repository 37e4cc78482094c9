"""Usage mistakes on every subcommand: one line on stderr, exit 2, no traceback; --version; bare diffem."""

from __future__ import annotations

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
    assert code == 0 and "Usage" in out and "corrupt" in out and "Traceback" not in out + err
    code, out, err = cli("config")
    assert code == 0 and "show" in out


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
