"""The ``diffem`` command: a thin Typer layer over the library's functions.

Each subcommand lives in ``diffem_cli.cli.commands.<module>`` and registers itself through that
module's ``register(app)``. Errors the user can fix are printed as one line on stderr with exit
code 2, never as a traceback. Usage mistakes (unknown option, missing argument, bad value,
unknown command) are one line too, exit 2; so is a bare ``diffem``, which prints the help, and a
write the file system refuses (full disk, quota, read-only), whichever library reported it. Typer
0.29 and later bundle their own copy of click (``typer._click``), older ones use the standalone
``click``: both kinds of exception are caught.

Importing this module and rendering help stay light: the command modules import torch, datasets,
diffusers and the pipeline inside their functions, so ``diffem --help``, ``--version`` and
``channels`` never load them (``bench/bench_cli.py`` times them). Help is click's plain layout:
flags read as flags (``--force``; ``--uncond / --no-uncond`` where both make sense), not as
``<bool>`` (typer's rich panels show every option's type), and help paragraphs are re-wrapped.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import sys
from typing import Annotated, Any

import typer

from diffem_cli.core.threads import openmp_wait_env, parse_threads, set_threads

# Before torch loads OpenMP: waiting threads sleep instead of spinning (see diffem_cli.core.threads).
os.environ.update(openmp_wait_env())

from diffem_cli.core.allocator import keep_freed_memory  # noqa: E402

keep_freed_memory()  # before torch allocates: freed activations are reused, not re-faulted

from diffem_channels.base import ChannelError  # noqa: E402
from diffem_cli import __version__  # noqa: E402
from diffem_cli.core.errors import DiffemError  # noqa: E402

COMMAND_MODULES: tuple[str, ...] = (
    "channels_cmd",
    "methods_cmd",
    "corrupt_cmd",
    "import_cmd",
    "em_cmd",
    "reconstruct_cmd",
    "uncond_cmd",
    "export_cmd",
    "report_cmd",
    "evaluate_cmd",
    "config_cmd",
    "compare_cmd",
    "images_cmd",
)

DEBUG_ENV = "DIFFEM_DEBUG"
VERBOSE_HELP = "Also show debug messages (progress bars unchanged)."
QUIET_HELP = "Show only warnings and errors (progress bars unchanged)."
TORCH_FREE: frozenset[str] = frozenset({"channels"})
"""Commands that run without torch: the thread setting (which imports torch) is skipped for them."""


def _click_modules() -> list[Any]:
    """The exception modules of every click copy typer may be using (bundled and standalone)."""
    mods = []
    for name in ("typer._click.exceptions", "click.exceptions"):
        try:
            mods.append(importlib.import_module(name))
        except ImportError:
            continue
    return mods


_MODS = _click_modules()
USAGE_ERRORS: tuple[type[BaseException], ...] = tuple(m.UsageError for m in _MODS)
CLICK_ERRORS: tuple[type[BaseException], ...] = tuple(m.ClickException for m in _MODS)


def _classes(name: str) -> tuple[type[BaseException], ...]:
    found = [getattr(m, name, None) for m in _MODS] + [getattr(typer, name, None)]
    return tuple(dict.fromkeys(c for c in found if isinstance(c, type)))


EXITS = _classes("Exit")
ABORTS = _classes("Abort")
NO_ARGS_HELP: tuple[type[BaseException], ...] = tuple(
    m.NoArgsIsHelpError for m in _MODS if hasattr(m, "NoArgsIsHelpError")
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"diffem {__version__}")
        raise typer.Exit(0)


app = typer.Typer(
    name="diffem",
    help="Learn clean diffusion models from corrupted data alone (DiffEM and its peers).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)


@app.callback()
def _root(
    ctx: typer.Context,
    version: Annotated[
        bool,
        typer.Option(
            "--version", "-V", help="Print the version and exit.", callback=_version_callback, is_eager=True
        ),
    ] = False,
    threads: Annotated[
        str | None,
        typer.Option(
            "--threads",
            metavar="N|all",
            help="Torch CPU threads (N, or 'all'); default: DIFFEM_THREADS, else every core "
            "(docs/reproducibility.md).",
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help=VERBOSE_HELP)] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help=QUIET_HELP)] = False,
) -> None:
    """Learn clean diffusion models from corrupted data alone (DiffEM and its peers)."""
    from diffem_cli.core.logs import configure

    configure(int(verbose) - int(quiet))
    obj = ctx.obj if isinstance(ctx.obj, dict) else {}
    if ctx.invoked_subcommand in TORCH_FREE or obj.get("help"):
        if threads is not None:
            parse_threads(threads)  # a bad value is still a mistake
        return
    if threads is not None or obj.get("default_threads"):
        set_threads(threads)


for _name in COMMAND_MODULES:
    importlib.import_module(f"diffem_cli.cli.commands.{_name}").register(app)


def _set_verbosity(level: int) -> Any:
    def callback(value: bool) -> None:
        if value:
            from diffem_cli.core.logs import configure

            configure(level)

    return callback


VERBOSITY = (
    inspect.Parameter(
        "_verbose",
        inspect.Parameter.KEYWORD_ONLY,
        default=False,
        annotation=Annotated[
            bool,
            typer.Option(
                "--verbose",
                "-v",
                help=VERBOSE_HELP,
                callback=_set_verbosity(1),
                expose_value=False,
            ),
        ],
    ),
    inspect.Parameter(
        "_quiet",
        inspect.Parameter.KEYWORD_ONLY,
        default=False,
        annotation=Annotated[
            bool,
            typer.Option(
                "--quiet",
                "-q",
                help=QUIET_HELP,
                callback=_set_verbosity(-1),
                expose_value=False,
            ),
        ],
    ),
)


def _with_verbosity(typer_app: typer.Typer) -> None:
    """Give every command of ``typer_app`` (nested groups included) ``-v``/``-q`` after its name,
    as the root takes them before it: two keyword parameters added to the signature typer reads,
    whose callbacks set the level; typer hands their values over all the same, and the wrapper
    drops them before calling the command's own function."""
    for info in typer_app.registered_commands:
        fn = info.callback
        if fn is None or getattr(fn, "__diffem_verbosity__", False):
            continue

        @functools.wraps(fn)
        def command(*args: Any, __fn: Any = fn, **kwargs: Any) -> Any:
            kwargs.pop("_verbose", None)
            kwargs.pop("_quiet", None)
            return __fn(*args, **kwargs)

        sig = inspect.signature(fn, eval_str=True)  # typer reads the objects, not the strings
        params = list(sig.parameters.values())
        at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
        command.__signature__ = sig.replace(parameters=[*params[:at], *VERBOSITY, *params[at:]])
        command.__diffem_verbosity__ = True
        info.callback = command
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            _with_verbosity(group.typer_instance)


_with_verbosity(app)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _fail(message: str, code: int = 2) -> int:
    sys.stderr.write(f"error: {_one_line(message)}\n")
    sys.stderr.flush()
    return code


def _usage_error(e: BaseException) -> int:
    """Click's message and the command's usage line, on one line of stderr; exit 2."""
    message = e.format_message() if hasattr(e, "format_message") else str(e)
    ctx = getattr(e, "ctx", None)
    usage = ""
    if ctx is not None:
        try:
            usage = _one_line(ctx.get_usage())
            usage = f" ({usage}; see '{ctx.command_path} --help')"
        except Exception:  # a context without a command: the message alone is enough
            usage = ""
    return _fail(f"{_one_line(message)}{usage}", int(getattr(e, "exit_code", 2) or 2))


def os_error_message(e: OSError) -> str:
    """``PATH: reason`` for a file-system error (e.g. ``out/x.arrow: No space left on device``)."""
    if e.filename is not None and e.strerror:
        target = f" -> {e.filename2}" if e.filename2 is not None else ""
        return f"{e.filename}{target}: {e.strerror}"
    return f"{type(e).__name__}: {e}"


def run(argv: list[str] | None = None, *, default_threads: bool = False) -> int:
    """Run the CLI on ``argv`` and return its exit code (what ``main`` exits with).

    ``default_threads``: without ``--threads``, set torch's threads from ``DIFFEM_THREADS`` or the
    default (the console command does; a caller in-process keeps its own setting).
    """
    asks_help = "--help" in (sys.argv[1:] if argv is None else argv)  # only prints: torch stays out
    try:
        obj = {"default_threads": default_threads, "help": asks_help}
        result = app(args=argv, prog_name="diffem", standalone_mode=False, obj=obj)
    except NO_ARGS_HELP as e:
        sys.stdout.write(e.format_message().rstrip("\n") + "\n")  # bare ``diffem``: the help, exit 2
        return 2
    except EXITS as e:
        return int(getattr(e, "exit_code", 0) or 0)
    except ABORTS:
        return _fail("aborted", 130)
    except USAGE_ERRORS as e:
        return _usage_error(e)
    except CLICK_ERRORS as e:
        return _fail(e.format_message(), int(getattr(e, "exit_code", 1) or 1))
    except (DiffemError, ChannelError) as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        return _fail("interrupted; run the same command again to resume where supported", 130)
    except MemoryError:
        return _fail("out of memory; try a smaller --batch-size or chunk size", 1)
    except Exception as e:
        if os.environ.get(DEBUG_ENV):
            raise
        from diffem_cli.io.store import os_error

        disk = os_error(e)  # a full disk, also when a library wraps it in its own exception type
        if disk is not None:
            return _fail(os_error_message(disk))
        if isinstance(e, OSError):
            return _fail(os_error_message(e), 1)
        return _fail(f"internal error ({type(e).__name__}: {e}); set {DEBUG_ENV}=1 for the traceback", 1)
    return result if isinstance(result, int) else 0


def main() -> None:
    """Console-script entry point (sets torch's threads: DIFFEM_THREADS or the default, which
    ``--threads`` overrides; once a command that uses torch starts, so help stays light)."""
    sys.exit(run(default_threads=True))
