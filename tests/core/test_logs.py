"""Library messages through ``logging``: the ``diffem`` hierarchy on the console, -q and -v."""

from __future__ import annotations

import logging

import pytest

from diffem_cli.core.logs import configure, get_logger, notice


@pytest.fixture(autouse=True)
def _default_level():
    yield
    configure(0)


def test_module_loggers_sit_under_diffem():
    assert get_logger("diffem_cli.pipeline.em").name == "diffem.pipeline.em"
    assert get_logger("diffem_cli").name == "diffem"


@pytest.mark.parametrize(
    ("verbosity", "shown"),
    [(-1, {"warning"}), (0, {"info", "warning"}), (1, {"debug", "info", "warning"})],
)
def test_the_level_follows_the_verbosity(capsys, verbosity, shown):
    configure(verbosity)
    log = get_logger("diffem_cli.somewhere")
    log.debug("a debug message")
    notice("an info notice [kept as written]")
    log.warning("a warning")
    err = capsys.readouterr().err
    assert ("a debug message" in err) == ("debug" in shown)
    assert ("an info notice [kept as written]" in err) == ("info" in shown)
    assert "warning: a warning" in err  # -q keeps warnings
    assert logging.getLogger("diffem").handlers and not logging.getLogger("diffem").propagate


def test_configuring_twice_adds_no_second_handler(capsys):
    configure(0)
    configure(0)
    notice("once")
    assert capsys.readouterr().err.count("once") == 1
