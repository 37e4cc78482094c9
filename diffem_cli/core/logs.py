"""Library messages through Python's ``logging``: the ``diffem`` logger hierarchy.

Modules log to ``get_logger(__name__)`` (``diffem_cli.pipeline.em`` logs as ``diffem.pipeline.em``).
The command line shows ``diffem`` records on stderr through the same console as the progress bars
(so a message lands above a live bar, and a process other than the main one, whose console is
quiet, shows none): INFO and above by default, DEBUG with ``-v``, WARNING and above with ``-q``.
A program that imports diffem configures ``logging`` as it likes; nothing is printed for it.
"""

from __future__ import annotations

import logging

ROOT = "diffem"

LEVELS = {-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}
"""Verbosity (``-q``, default, ``-v``) to the level of the ``diffem`` logger."""


def get_logger(module: str) -> logging.Logger:
    """The logger of a diffem module: ``diffem_cli.x.y`` logs as ``diffem.x.y``."""
    suffix = module.removeprefix("diffem_cli").lstrip(".")
    return logging.getLogger(f"{ROOT}.{suffix}" if suffix else ROOT)


class ConsoleHandler(logging.Handler):
    """Writes a record's message as one console line (no markup: paths and values print as they are;
    a record logged with ``extra={"markup": True}`` may colour itself)."""

    def emit(self, record: logging.LogRecord) -> None:
        from diffem_cli.core.progress import console

        try:
            message = self.format(record)
            if record.levelno >= logging.WARNING:
                message = f"{record.levelname.lower()}: {message}"
            console.print(message, soft_wrap=True, markup=getattr(record, "markup", False), highlight=False)
        except Exception:  # logging must never break the command (logging's own convention)
            self.handleError(record)


def configure(verbosity: int = 0) -> None:
    """Show ``diffem`` records on the console at the level of ``verbosity`` (-1 quiet, 0, 1 verbose);
    calling it again only changes the level."""
    logger = logging.getLogger(ROOT)
    logger.setLevel(LEVELS[max(-1, min(1, verbosity))])
    if not any(isinstance(h, ConsoleHandler) for h in logger.handlers):
        logger.addHandler(ConsoleHandler())
    logger.propagate = False  # the console shows them once, whatever the root logger does


def notice(message: str, markup: bool = False) -> None:
    """A command's notice (what it wrote, that it is done): INFO on the ``diffem.cli`` logger, so
    ``-q`` hides it; ``markup`` lets it colour itself (``[green]done[/green]``)."""
    logging.getLogger(f"{ROOT}.cli").info(message, extra={"markup": markup})
