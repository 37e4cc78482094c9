"""Training loop: the loss goes down, a resumed run equals an uninterrupted one, EMA, schedule, NaN."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffem_cli.core.errors import DiffemError
from diffem_cli.diffusion.checkpoint import load_tensors
from diffem_cli.diffusion.nets import build_network
from diffem_cli.diffusion.train import EMA, TrainConfig, TrainResult, lr_at, train_denoiser

CPU = torch.device("cpu")
MLP = {"type": "mlp", "width": 32, "depth": 2, "emb_dim": 16}


def _data(n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    z = torch.rand(n, 1, generator=g)
    x = torch.cat([torch.cos(3 * z), torch.sin(3 * z), z], dim=1)
    return x, x[:, :1] + 0.01 * torch.randn(n, 1, generator=g)


def _net(cond_size: int = 1) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_network(MLP, (3,), cond_size)


def _train_from_state(
    x: torch.Tensor, c: torch.Tensor, cfg: TrainConfig, state: Path, tag: dict
) -> tuple[TrainResult, list[int]]:
    """Train a fresh network with training state at ``state`` (resumed when its tag is ``tag``);
    returns the result and the epochs that ran."""
    epochs: list[int] = []
    result = train_denoiser(
        _net(),
        {"x": x, "cond": c},
        cfg,
        seed=0,
        device=CPU,
        state_path=state,
        tag=tag,
        on_epoch=lambda r: epochs.append(r["epoch"]),
    )
    return result, epochs


def test_loss_decreases():
    x, c = _data(512)
    cfg = TrainConfig(batch_size=64, epochs=12, lr=3e-3, lr_min=1e-4, warmup=5, ema_decay=0.9)
    losses = []
    result = train_denoiser(
        _net(), {"x": x, "cond": c}, cfg, seed=0, device=CPU, on_epoch=lambda r: losses.append(r["loss"])
    )
    assert len(losses) == 12 and result.steps == 12 * 8
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses
    assert result.last_loss == losses[-1]


class _Stop(Exception):
    pass


def test_resume_continues_and_matches_uninterrupted(tmp_path):
    x, c = _data()
    cfg = TrainConfig(batch_size=32, epochs=4, lr=1e-3, warmup=3, ema_decay=0.9)
    state = tmp_path / "state.safetensors"
    tag = {"lap": 1, "fingerprint": "abc"}

    full = train_denoiser(_net(), {"x": x, "cond": c}, cfg, seed=7, device=CPU)

    seen: list[dict] = []

    def stop_after_two(info: dict) -> None:
        seen.append(info)
        if info["epoch"] == 2:
            raise _Stop

    with pytest.raises(_Stop):
        train_denoiser(
            _net(),
            {"x": x, "cond": c},
            cfg,
            seed=7,
            device=CPU,
            state_path=state,
            tag=tag,
            on_epoch=stop_after_two,
        )
    _, meta = load_tensors(state)
    assert meta["epoch"] == 2 and meta["step"] == 2 * (256 // 32) and meta["tag"] == tag

    resumed_epochs: list[dict] = []
    resumed = train_denoiser(
        _net(),
        {"x": x, "cond": c},
        cfg,
        seed=7,
        device=CPU,
        state_path=state,
        tag=tag,
        on_epoch=resumed_epochs.append,
    )
    assert [r["epoch"] for r in resumed_epochs] == [3, 4]
    assert resumed_epochs[0]["step"] == 3 * 8 and resumed.steps == full.steps == 4 * 8
    # weights, EMA, optimiser moments and random state were all restored: same result bit for bit
    for (name, a), (_, b) in zip(
        full.ema_model.state_dict().items(), resumed.ema_model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert resumed.last_loss == full.last_loss


def test_resume_after_the_last_epoch_keeps_its_loss(tmp_path):
    """Killed between the last epoch's state save and the checkpoint: the rerun trains nothing more
    and still reports the last epoch's loss (not NaN)."""
    x, c = _data(64)
    cfg = TrainConfig(batch_size=32, epochs=2, warmup=0)
    state = tmp_path / "state.safetensors"
    losses: list[float] = []

    def stop_at_end(info: dict) -> None:
        losses.append(info["loss"])
        if info["epoch"] == 2:
            raise _Stop

    with pytest.raises(_Stop):
        train_denoiser(
            _net(),
            {"x": x, "cond": c},
            cfg,
            seed=0,
            device=CPU,
            state_path=state,
            tag={},
            on_epoch=stop_at_end,
        )
    result, epochs = _train_from_state(x, c, cfg, state, {})
    assert epochs == [] and result.steps == 4
    assert result.last_loss == losses[-1]


def test_state_with_another_tag_is_ignored(tmp_path):
    x, c = _data(64)
    cfg = TrainConfig(batch_size=32, epochs=2, warmup=0)
    state = tmp_path / "state.safetensors"
    train_denoiser(_net(), {"x": x, "cond": c}, cfg, seed=0, device=CPU, state_path=state, tag={"lap": 1})
    assert _train_from_state(x, c, cfg, state, {"lap": 2})[1] == [1, 2]
    # a corrupt state file is ignored too (training starts over instead of failing)
    state.write_bytes(b"garbage")
    assert _train_from_state(x, c, cfg, state, {"lap": 2})[1] == [1, 2]


def test_unconditional_training_and_small_data():
    x, _ = _data(20)
    result = train_denoiser(
        _net(0), {"x": x}, TrainConfig(batch_size=64, epochs=2, warmup=0), seed=0, device=CPU
    )
    assert result.steps == 2  # batch shrinks to the data size: one step per epoch
    with pytest.raises(DiffemError, match="no training samples"):
        train_denoiser(_net(0), {"x": x[:0]}, TrainConfig(), seed=0, device=CPU)


def test_ema_matches_closed_form():
    net = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(0.0)
    ema = EMA(net, decay=0.5)
    expected = 0.0
    for n, value in enumerate([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], start=1):
        with torch.no_grad():
            net.weight.fill_(value)
        ema.update(net)
        d = min(0.5, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * value
        assert ema.model.weight.item() == pytest.approx(expected, rel=1e-6)
    assert not ema.model.weight.requires_grad


def test_ema_decay_zero_is_the_model_itself():
    x, c = _data(64)
    net = _net()
    result = train_denoiser(
        net, {"x": x, "cond": c}, TrainConfig(batch_size=32, epochs=1, ema_decay=0.0), seed=0, device=CPU
    )
    for a, b in zip(result.ema_model.parameters(), net.parameters(), strict=True):
        assert torch.equal(a, b)
    assert not any(
        torch.equal(a, b) for a, b in zip(result.ema_model.parameters(), _net().parameters(), strict=True)
    )


def test_lr_schedule():
    cfg = TrainConfig(lr=1e-3, lr_min=1e-5, warmup=10)
    assert lr_at(0, 110, cfg) == pytest.approx(1e-4)
    assert lr_at(9, 110, cfg) == pytest.approx(1e-3)
    assert lr_at(10, 110, cfg) == pytest.approx(1e-3)
    assert lr_at(60, 110, cfg) == pytest.approx((1e-3 + 1e-5) / 2)
    assert lr_at(110, 110, cfg) == pytest.approx(1e-5)
    values = [lr_at(s, 110, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_diverging_loss_is_an_error_and_saves_no_state(tmp_path):
    x, c = _data(128)
    state = tmp_path / "state.safetensors"
    cfg = TrainConfig(batch_size=32, epochs=3, lr=1e30, warmup=0, grad_clip=0.0)
    with pytest.raises(DiffemError) as info:
        train_denoiser(_net(), {"x": x, "cond": c}, cfg, seed=0, device=CPU, state_path=state, tag={"lap": 1})
    assert "loss became" in str(info.value) and "\n" not in str(info.value)
    assert not state.exists()
