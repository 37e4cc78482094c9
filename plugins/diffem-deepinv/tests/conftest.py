"""Shared setup of diffem-deepinv's tests: offline, one torch thread, no network at all.

The tests need deepinv (and torchvision), which do not import beside the CPU torch of diffem's
main environment; ``make test-deepinv`` builds their own environment. Each test module starts with
``pytest.importorskip("deepinv")``, so a run without deepinv skips them instead of failing.
"""

from __future__ import annotations

import os
import socket

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """deepinv must not download anything: the channels use analytic operators only."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"a test tried to open a network connection: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def pytest_configure(config):
    try:
        import torch
    except ImportError:  # pragma: no cover
        return
    # tiny networks: a second thread only adds overhead (DIFFEM_TEST_THREADS overrides, as in diffem)
    torch.set_num_threads(int(os.environ.get("DIFFEM_TEST_THREADS") or 1))
