"""The Typer command line: a thin layer over :mod:`diffem_cli.pipeline`."""
