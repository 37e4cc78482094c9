"""The ``diffem`` command: a thin Typer layer over the library's functions.

Each subcommand lives in ``diffem_cli.commands.<module>`` and registers itself through that
module's ``register(app)``. Errors the user can fix are printed as one line on stderr with exit
code 2, never as a traceback.
"""

from __future__ import annotations

import importlib
import sys

import click
import typer

from diffem_channels.base import ChannelError
from diffem_cli.errors import DiffemError

COMMAND_MODULES: tuple[str, ...] = (
    "channels_cmd",
    "corrupt_cmd",
    "em_cmd",
    "reconstruct_cmd",
    "uncond_cmd",
    "export_cmd",
    "report_cmd",
    "evaluate_cmd",
)

app = typer.Typer(
    name="diffem",
    help="Learn clean diffusion models from corrupted data alone (DiffEM and its peers).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

for _name in COMMAND_MODULES:
    importlib.import_module(f"diffem_cli.commands.{_name}").register(app)


def _fail(message: str, code: int = 2) -> int:
    sys.stderr.write(f"error: {message}\n")
    return code


def run(argv: list[str] | None = None) -> int:
    """Run the CLI on ``argv`` and return its exit code (what ``main`` exits with)."""
    try:
        result = app(args=argv, prog_name="diffem", standalone_mode=False)
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.exceptions.Abort:
        return _fail("aborted", 130)
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except (DiffemError, ChannelError) as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        return _fail("interrupted; run the same command again to resume where supported", 130)
    return result if isinstance(result, int) else 0


def main() -> None:
    """Console-script entry point."""
    sys.exit(run())
