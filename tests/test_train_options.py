"""Training options: timestep sampling and fresh corruptions within a lap."""

import pytest
import torch

from diffem_cli.config import TrainConfig
from diffem_cli.diffusion import ddpm_scheduler, draw_timesteps
from diffem_cli.errors import DiffemError
from diffem_cli.nets import VectorMLP
from diffem_cli.train import train_denoiser


def test_log_sigma_sampling_favours_low_noise_and_covers_all_steps():
    sched = ddpm_scheduler()
    gen = torch.Generator().manual_seed(0)
    uniform = draw_timesteps(50_000, sched, "uniform", gen)
    logs = draw_timesteps(50_000, sched, "log-sigma", gen)
    assert uniform.min() >= 0 and uniform.max() <= 999
    assert logs.min() >= 0 and logs.max() == 999
    low = lambda t: (t < 100).float().mean().item()  # noqa: E731
    assert low(logs) > 2 * low(uniform)
    with pytest.raises(DiffemError, match="t_sampling"):
        draw_timesteps(4, sched, "beta", gen)


def test_refresh_replaces_the_conditioning_every_k_epochs():
    x = torch.randn(64, 3)
    calls = []

    def refresh(r: int) -> torch.Tensor:
        calls.append(r)
        return torch.randn(64, 2)

    cfg = TrainConfig(batch_size=32, epochs=7, warmup=0)
    model = VectorMLP(3, 2, width=16, depth=1, emb_dim=8)
    train_denoiser(
        model,
        x,
        torch.randn(64, 2),
        cfg,
        seed=0,
        device=torch.device("cpu"),
        refresh=refresh,
        refresh_every=3,
    )
    assert calls == [1, 2]


def test_refresh_resumes_with_the_round_of_its_epoch(tmp_path):
    x = torch.randn(64, 3)
    calls = []

    def refresh(r: int) -> torch.Tensor:
        calls.append(r)
        return torch.full((64, 2), float(r))

    state = tmp_path / "state.safetensors"
    model = VectorMLP(3, 2, width=16, depth=1, emb_dim=8)
    train_denoiser(
        model,
        x,
        torch.zeros(64, 2),
        TrainConfig(batch_size=32, epochs=4, warmup=0),
        seed=0,
        device=torch.device("cpu"),
        state_path=state,
        tag={"t": 1},
        refresh=refresh,
        refresh_every=3,
    )
    calls.clear()
    train_denoiser(
        VectorMLP(3, 2, width=16, depth=1, emb_dim=8),
        x,
        torch.zeros(64, 2),
        TrainConfig(batch_size=32, epochs=5, warmup=0),
        seed=0,
        device=torch.device("cpu"),
        state_path=state,
        tag={"t": 1},
        refresh=refresh,
        refresh_every=3,
    )
    assert calls == [1]
