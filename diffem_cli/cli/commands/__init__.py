"""The Typer commands, one module each, registered by :mod:`diffem_cli.cli.app`."""
