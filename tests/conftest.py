"""Shared fixtures: the in-process CLI and a fake ``site`` folder for plugin distributions.

Tiny run settings and plain helper functions live in ``helpers.py``; ``TINY_MLP`` and ``TINY_UNET``
are re-exported here for tests that still import them from ``conftest``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import TINY_MLP, TINY_UNET, forget_modules

__all__ = ["TINY_MLP", "TINY_UNET"]

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The test networks are tiny and a second thread only adds overhead, so the suite runs on one torch
# thread unless DIFFEM_TEST_THREADS says otherwise (CI also runs it with 2: results must not depend
# on the thread count beyond the tolerances the tests derive).
torch.set_num_threads(int(os.environ.get("DIFFEM_TEST_THREADS") or 1))


@pytest.fixture
def cli(capsys):
    """Run the diffem CLI in-process; returns (exit code, stdout, stderr)."""
    from diffem_cli.cli.app import run

    def call(*args: str) -> tuple[int, str, str]:
        code = run([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return call


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Path]:
    """A fresh folder to put on ``sys.path`` for fake installed distributions (see
    ``helpers.fake_dist``); modules imported from it are forgotten afterwards."""
    root = tmp_path / "site"
    root.mkdir()
    yield root
    forget_modules(root)
