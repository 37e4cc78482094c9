"""``diffem methods``: list the installed methods (built-in and plugins), broken ones included."""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from rich.table import Table

    from diffem_cli.methods.registry import MethodInfo


def served_channels(info: MethodInfo, channels: list[Any]) -> list[str]:
    """The names of the installed channels (classes) the method accepts (``Method.accepts``)."""
    if info.cls is None:
        return []
    try:
        method = info.cls()
        return [c.name for c in channels if method.accepts(c) is None]
    except Exception:  # a plugin's own bug must not break the listing
        return []


def describe(info: MethodInfo, channels: list[Any]) -> dict[str, Any]:
    """A JSON-able description of one method entry (what ``--json`` prints)."""
    out = info.summary()
    cls = info.cls
    if cls is not None:
        out.update(
            description=cls.description,
            kind=cls.kind,
            needs_clean=bool(cls.needs_clean),
            compared_by_default=bool(cls.compared_by_default),
            options={s: dataclasses.asdict(k()) for s, k in dict(cls.option_classes).items()},
            channels=served_channels(info, channels),
        )
    return out


def _table(rows: list[dict[str, Any]]) -> Table:
    from rich.table import Table
    from rich.text import Text

    table = Table(title="diffem methods", title_justify="left")
    table.add_column("name", no_wrap=True, style="bold")
    table.add_column("distribution", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    table.add_column("options")
    table.add_column("channels")
    table.add_column("description", ratio=1)
    for row in rows:
        if not row["ok"]:
            error = Text(f"broken: {row['error']}", style="red")
            table.add_row(Text(row["name"]), Text(row["dist"]), "-", "-", "-", error)
            continue
        options = "\n".join(f"{s}: {', '.join(v)}" for s, v in row["options"].items()) or "-"
        table.add_row(
            Text(row["name"]),
            Text(row["dist"]),
            Text(row["kind"]),
            Text(options),
            Text(", ".join(row["channels"]) or "-"),
            Text(row["description"]),
        )
    return table


def methods(
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """List the installed methods and the channels each can serve.

    For each method: its kind, its option sections (set with --set SECTION.KEY=VALUE), the
    installed channels it can serve; broken plugins are listed with their error.
    """
    from rich.console import Console

    from diffem_cli.io import registry as channel_registry
    from diffem_cli.methods.registry import list_methods

    channels = [i.cls for i in channel_registry.list_channels(load=True) if i.ok and i.cls is not None]
    rows = [describe(i, channels) for i in list_methods()]
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 140)  # pipes and logs: do not squeeze the table
    console.print(_table(rows))


def register(app: typer.Typer) -> None:
    """Add the ``methods`` command to ``app``."""
    app.command("methods")(methods)
