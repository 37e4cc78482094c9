"""Data consistency: on the entries a noiseless channel gives exactly, every posterior sample is
``y`` bit for bit (DiffEM, the oracle and every other method), the conditional models train on the
other entries only, and noisy channels are left as they were."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import QUICK, TINY_UNET, read_x, run_ok, sets

from diffem_cli.diffusion.denoise import Denoiser, KeepObserved
from diffem_cli.diffusion.losses import VLoss, noised
from diffem_cli.diffusion.schedule import ddpm_scheduler
from diffem_cli.io.observations import Observations

TRAIN = [*TINY_UNET, *sets("train.batch_size=32", "train.epochs=1"), *QUICK]


def _corrupt(root: Path, *params: str) -> Path:
    run_ok(
        "corrupt",
        "digits",
        root / "obs",
        "--channel",
        "mask",
        *params,
        "--limit",
        48,
        "--clean-out",
        root / "clean",
    )
    return root


@pytest.fixture(scope="module")
def masked(tmp_path_factory) -> Path:
    return _corrupt(tmp_path_factory.mktemp("keep"), "-p", "rho=0.5")


def _observed(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    data = Observations(folder)
    return data.obs["y"], data.channel.exact_entries(data.obs)


@pytest.mark.parametrize("method", ["diffem", "oracle", "em-mmps", "dps-em"])
def test_samples_equal_y_on_the_observed_entries(masked, tmp_path, method):
    extra = ["--clean", masked / "clean"] if method == "oracle" else []
    run_ok("em-train", masked / "obs", tmp_path / "run", "--laps", 1, "--method", method, *TRAIN, *extra)
    y, exact = _observed(masked / "obs")
    assert exact is not None and 0 < float(exact.mean()) < 1
    for folder in (tmp_path / "run/recon/lap_001", tmp_path / "run/recon/lap_000"):
        x = read_x(folder)
        assert torch.equal(x * exact, y * exact), folder
    run_ok("reconstruct", tmp_path / "run/checkpoints/lap_001.safetensors", masked / "obs", tmp_path / "rec")
    x = read_x(tmp_path / "rec")
    assert torch.equal(x * exact, y * exact)
    assert not torch.equal(x * (1 - exact), y * (1 - exact))  # the missing entries are sampled


def test_turning_it_off_restores_the_free_sampler(masked, tmp_path):
    args = ["--laps", 1, *TRAIN, *sets("sample.keep_observed=false")]
    run_ok("em-train", masked / "obs", tmp_path / "run", *args)
    y, exact = _observed(masked / "obs")
    assert not torch.equal(read_x(tmp_path / "run/recon/lap_001") * exact, y * exact)


def test_noisy_channels_are_untouched(tmp_path):
    root = _corrupt(tmp_path, "-p", "rho=0.5", "-p", "sigma=0.1")
    _, exact = _observed(root / "obs")
    assert exact is None
    for keep in ("true", "false"):
        run_ok(
            "em-train",
            root / "obs",
            tmp_path / keep,
            "--laps",
            1,
            *TRAIN,
            *sets(f"sample.keep_observed={keep}"),
        )
    assert torch.equal(read_x(tmp_path / "true/recon/lap_001"), read_x(tmp_path / "false/recon/lap_001"))


def test_keep_observed_denoiser_takes_y_exactly_where_given():
    class Half(Denoiser):
        def __call__(self, x_t, t):
            return x_t * 0.5

    inner = Half()
    y = torch.randn(3, 1, 4, 4)
    exact = (torch.rand(3, 1, 4, 4) < 0.5).float()
    x_t = torch.randn(3, 1, 4, 4)
    out = KeepObserved(inner, exact, y)(x_t, 10)
    assert torch.equal(out[exact > 0], y[exact > 0]) and torch.equal(out[exact == 0], (x_t * 0.5)[exact == 0])


def test_weighted_vloss_is_the_mean_over_weighted_entries():
    class Zero(torch.nn.Module):
        def forward(self, x_t, t, cond=None):
            return torch.zeros_like(x_t)

    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
    weight = torch.zeros(16, 6)
    weight[:, :2] = 1.0
    sched = ddpm_scheduler()
    loss = VLoss()(Zero(), {"x": x, "weight": weight}, sched, torch.Generator().manual_seed(0))
    _, t, noise = noised(x, sched, torch.Generator().manual_seed(0))  # the loss's own draws
    expected = sched.get_velocity(x, noise, t)[:, :2].square().mean()
    # float32 sums of non-negative terms: 96 (the weighted sum, zeros included) and 32 (the mean),
    # relative errors below 96 u and 32 u, plus one rounding per division (u = 2^-24)
    assert torch.allclose(loss, expected, rtol=(96 + 32 + 2) * 2.0**-24, atol=0)
