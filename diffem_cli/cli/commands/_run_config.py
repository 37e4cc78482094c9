"""The configuration of a command that writes a RUN (``em-train``, ``train-uncond``): by default the
RUN's own, so that resuming or extending a RUN needs none of its ``--set`` options again."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from diffem_cli.core.errors import DiffemError
from diffem_cli.core.logs import notice

ANOTHER_CONFIGURATION = "holds another configuration"
"""The words of the RUN's refusal of a changed configuration (``Run.prepare``), which the command
completes with how to continue the RUN instead."""


def config_source(run: Path, config: str | None, force: bool) -> str | None:
    """What ``--config`` to load: ``config`` when given or with ``force`` (starting over), else the
    RUN's own ``config.yaml`` when it has one, else None (the preset for the data)."""
    if config is None and not force and (Path(run) / "config.yaml").is_file():
        notice(f"configuration: {run}/config.yaml (the RUN's own)")
        return str(run)
    return config


@contextlib.contextmanager
def suggest_own_config(run: Path, source: str | None) -> Iterator[None]:
    """Complete a refusal of another configuration for ``run`` with ``--config RUN``, the way to
    continue it, unless its own configuration was the one given."""
    try:
        yield
    except DiffemError as e:
        if ANOTHER_CONFIGURATION not in str(e) or source == str(run):
            raise
        raise DiffemError(f"{e}; or continue it with its own: --config {run}") from None
