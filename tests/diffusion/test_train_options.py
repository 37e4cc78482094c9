"""Training options: fresh corruptions within a lap."""

import torch

from diffem_cli.diffusion.nets import VectorMLP
from diffem_cli.diffusion.train import TrainConfig, train_denoiser


def test_refresh_replaces_the_conditioning_every_k_epochs():
    x = torch.randn(64, 3)
    calls = []

    def refresh(r: int) -> dict[str, torch.Tensor]:
        calls.append(r)
        return {"cond": torch.randn(64, 2)}

    cfg = TrainConfig(batch_size=32, epochs=7, warmup=0)
    model = VectorMLP(3, 2, width=16, depth=1, emb_dim=8)
    train_denoiser(
        model,
        {"x": x, "cond": torch.randn(64, 2)},
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

    def refresh(r: int) -> dict[str, torch.Tensor]:
        calls.append(r)
        return {"cond": torch.full((64, 2), float(r))}

    state = tmp_path / "state.safetensors"
    model = VectorMLP(3, 2, width=16, depth=1, emb_dim=8)
    train_denoiser(
        model,
        {"x": x, "cond": torch.zeros(64, 2)},
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
        {"x": x, "cond": torch.zeros(64, 2)},
        TrainConfig(batch_size=32, epochs=5, warmup=0),
        seed=0,
        device=torch.device("cpu"),
        state_path=state,
        tag={"t": 1},
        refresh=refresh,
        refresh_every=3,
    )
    assert calls == [1]
