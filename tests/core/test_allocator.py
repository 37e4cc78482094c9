"""The command's allocator thresholds: set once, left to the user's own tuning, results unchanged."""

from __future__ import annotations

import subprocess
import sys

import pytest

from diffem_cli.core import allocator

TRAIN = """
import sys
from diffem_cli.core.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
import torch
torch.set_num_threads(1)
torch.manual_seed(0)
from diffem_cli.diffusion.nets import VectorMLP
from diffem_cli.diffusion.train import TrainConfig, train_denoiser
gen = torch.Generator().manual_seed(1)
data = {"x": torch.randn(512, 5, generator=gen), "cond": torch.randn(512, 3, generator=gen)}
result = train_denoiser(VectorMLP(5, 3, width=64, depth=2, emb_dim=8), data,
                        TrainConfig(batch_size=256, epochs=3, warmup=0), seed=0, device=torch.device("cpu"))
sums = (p.detach().double().sum().item().hex() for p in result.ema_model.parameters())
print(result.last_loss.hex(), *sums)
"""


def test_the_users_own_thresholds_are_left_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert allocator.keep_freed_memory() is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_training_is_bitwise_the_same_with_freed_memory_kept():
    def run(mode: str) -> str:
        out = subprocess.run([sys.executable, "-c", TRAIN, mode], capture_output=True, text=True, check=True)
        return out.stdout.strip()

    kept, default = run("keep"), run("default")
    assert kept and kept == default
