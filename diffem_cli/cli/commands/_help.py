"""Help texts built from what is installed and shipped, without importing torch or the methods.

``diffem --help`` builds every command's options, so these read package metadata and the presets
folder only: the method names from the ``diffem.methods`` entry points, the preset names from
``diffem_cli/config/presets/*.yaml``. Both are read once per process: typer evaluates a command's
annotations (and so these calls) several times while it builds the help.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

METHODS_GROUP = "diffem.methods"
"""The methods' entry-point group (``diffem_cli.methods.registry.GROUP``, which imports torch)."""


@cache
def preset_names() -> tuple[str, ...]:
    """The names of the shipped presets (``--config NAME``), sorted."""
    folder = resources.files("diffem_cli.config").joinpath("presets")
    return tuple(sorted(f.name.removesuffix(".yaml") for f in folder.iterdir() if f.name.endswith(".yaml")))


def config_help(default: str) -> str:
    """``--config`` help naming every shipped preset; ``default`` says what applies without it."""
    return f"Preset ({', '.join(preset_names())}), a YAML file or a RUN folder (its config.yaml). {default}"


def method_help(what: str) -> str:
    """``--method`` help naming the installed methods (``diffem methods`` lists them in full)."""
    return f"Method: {', '.join(_method_names())} ({what}; 'diffem methods' describes them)."


@cache
def _method_names() -> tuple[str, ...]:
    from diffem_cli.core.plugins import declared

    return tuple(sorted({ep.name for _, ep in declared(METHODS_GROUP)}))
