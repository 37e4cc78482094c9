"""``diffem channels [NAME]``: list the installed corruption channels, or show one in full."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from diffem_cli.io.registry import ChannelInfo


def describe(info: ChannelInfo) -> dict[str, Any]:
    """A JSON-able description of one channel entry (what ``--json`` prints)."""
    out = info.summary()
    cls = info.cls
    if cls is not None:
        out.update(
            description=cls.description,
            linear=bool(cls.linear),
            data_kinds=sorted(cls.data_kinds),
            api_version=cls.api_version,
            params=[
                {
                    "name": p.name,
                    "type": p.type.__name__,
                    "default": p.default,
                    "help": p.help,
                    "constraint": p.constraint,
                }
                for p in cls.params
            ],
        )
    return out


def _overview(infos: list[ChannelInfo]) -> Table:
    from rich.table import Table
    from rich.text import Text

    table = Table(title="diffem channels", title_justify="left", show_lines=False)
    table.add_column("name", no_wrap=True, style="bold")
    table.add_column("distribution", no_wrap=True)
    table.add_column("linear", no_wrap=True)
    table.add_column("data")
    table.add_column("parameters")
    table.add_column("description", ratio=1)
    for info in infos:
        cls = info.cls
        if info.error or cls is None:
            error = Text(f"broken: {info.error or 'not loaded'}", style="red")
            table.add_row(Text(info.name), Text(info.dist), "-", "-", "-", error)
            continue
        params = "\n".join(f"{p.name}={p.default!r}" for p in cls.params) or "-"
        table.add_row(
            Text(info.name),
            Text(info.dist),
            "yes" if cls.linear else "no",
            Text("\n".join(sorted(cls.data_kinds))),
            Text(params),
            Text(cls.description),
        )
    return table


def _detail(console: Console, info: ChannelInfo) -> None:
    from rich.table import Table
    from rich.text import Text

    console.print(Text(info.name, style="bold"))
    console.print(Text(f"distribution: {info.dist}"))
    console.print(Text(f"entry point:  {info.value}"))
    cls = info.cls
    if info.error or cls is None:
        console.print(Text(f"broken: {info.error or 'not loaded'}", style="red"))
        if cls is None:
            return
    console.print(Text(f"description:  {cls.description}"))
    console.print(Text(f"linear:       {'yes' if cls.linear else 'no'}"))
    console.print(Text(f"data:         {', '.join(sorted(cls.data_kinds))}"))
    console.print(Text(f"api version:  {cls.api_version}"))
    table = Table(title="parameters", title_justify="left")
    for column in ("parameter", "type", "default", "constraint", "help"):
        table.add_column(column, no_wrap=column != "help")
    for p in cls.params:
        table.add_row(
            Text(p.name), Text(p.type.__name__), Text(repr(p.default)), Text(p.constraint), Text(p.help)
        )
    console.print(table)


def channels(
    name: Annotated[str | None, typer.Argument(metavar="NAME", help="Show this channel in full.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """List the installed channels, or show one in full.

    Built-in channels and plugins alike; a broken plugin is listed with its error.
    """
    from rich.console import Console

    from diffem_cli.io import registry

    infos = registry.list_channels(load=True) if name is None else registry.channel_entries(name)
    if as_json:
        data: Any = [describe(i) for i in infos]
        if name is not None and len(infos) == 1:
            data = data[0]
        typer.echo(json.dumps(data, indent=2, default=str))
        return
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 120)  # pipes and logs: do not squeeze the table into 80 columns
    if name is None:
        console.print(_overview(infos))
        return
    for info in infos:
        _detail(console, info)


def register(app: typer.Typer) -> None:
    """Add the ``channels`` command to ``app``."""
    app.command("channels")(channels)
