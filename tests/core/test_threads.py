"""Torch thread settings of the diffem command: --threads, DIFFEM_THREADS and the default."""

from __future__ import annotations

import os

import pytest
import torch

from diffem_cli.core.errors import DiffemError
from diffem_cli.core.threads import DEFAULT_THREADS, THREADS_ENV, parse_threads, set_threads


@pytest.fixture(autouse=True)
def keep_threads(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv(THREADS_ENV, raising=False)
    yield
    torch.set_num_threads(before)


def test_parse_threads_counts_and_all():
    assert parse_threads("3") == 3
    assert parse_threads(2) == 2
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert parse_threads("all") == parse_threads(0) == cores


@pytest.mark.parametrize("bad", ["-1", "two", "1.5", ""])
def test_parse_threads_refuses_bad_values(bad):
    with pytest.raises(DiffemError, match="--threads"):
        parse_threads(bad)


def test_set_threads_order_option_env_default(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    default = parse_threads(DEFAULT_THREADS)
    assert set_threads() == default and torch.get_num_threads() == default
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # torch already follows it: left alone
    assert set_threads() == 1 and torch.get_num_threads() == 1
    monkeypatch.setenv(THREADS_ENV, "2")
    assert set_threads() == 2 and torch.get_num_threads() == 2
    assert set_threads("1") == 1 and torch.get_num_threads() == 1  # the option wins over the env
    monkeypatch.setenv(THREADS_ENV, "zero")
    with pytest.raises(DiffemError, match=THREADS_ENV):
        set_threads()


def test_cli_threads_option(cli):
    code, _, err = cli("--threads", "2", "config", "show")
    assert code == 0 and torch.get_num_threads() == 2
    code, _, err = cli("--threads", "none", "config", "show")
    assert code == 2 and err.startswith("error: --threads must be") and err.count("\n") == 1
