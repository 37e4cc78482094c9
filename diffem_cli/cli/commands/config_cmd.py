"""``diffem config show``: print the effective configuration (preset, RUN or YAML, plus --set)."""

from __future__ import annotations

from typing import Annotated

import typer

from diffem_cli.cli.commands._help import preset_names

config_app = typer.Typer(
    name="config",
    help="Inspect run configurations.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)


@config_app.command("show")
def show_command(
    source: Annotated[
        str | None,
        typer.Argument(
            metavar="SOURCE",
            help=f"A preset ({', '.join(preset_names())}), a RUN folder (its config.yaml) or a "
            "YAML file laid over the digits preset. Default: digits (em-train's default for images; "
            "manifold is the default for vector data).",
        ),
    ] = None,
    sets: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", metavar="KEY=VALUE", help="Override one key: train.lr=2e-4."),
    ] = None,
) -> None:
    """Print the effective configuration as YAML: every key, defaults filled in, validated."""
    import yaml

    from diffem_cli.config.run import effective_config
    from diffem_cli.methods import extensions

    cfg = effective_config(source, sets or [], extensions=extensions())
    typer.echo(yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip("\n"))


def register(app: typer.Typer) -> None:
    """Add the ``config`` command group to ``app``."""
    app.add_typer(config_app, name="config")
