"""Shared fixtures: tiny data sets and configs so the suite stays fast on 2 CPU cores."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # the test networks are tiny; a second thread only adds overhead

TINY_MLP = ["--set", "network.width=32", "--set", "network.depth=2", "--set", "network.emb_dim=16"]
TINY_UNET = [
    "--set", "network.block_out_channels=[16, 32]",
    "--set", "network.norm_num_groups=8",
    "--set", "network.down_block_types=[DownBlock2D, DownBlock2D]",
    "--set", "network.up_block_types=[UpBlock2D, UpBlock2D]",
]


@pytest.fixture
def cli(capsys):
    """Run the diffem CLI in-process; returns (exit code, stdout, stderr)."""
    from diffem_cli.cli import run

    def call(*args: str) -> tuple[int, str, str]:
        code = run([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return call
