"""The final projection onto ``{x : A x = y}`` (``sample.project``)."""

from __future__ import annotations

from pathlib import Path

import torch
from helpers import FAST, TINY_UNET, error_line, read_x, run_ok, sets

from diffem_channels import sample_seeds
from diffem_cli.gaussian.data_consistency import project_onto_observations
from diffem_cli.io.observations import Observations
from diffem_cli.io.registry import make_channel


def test_the_projection_is_the_nearest_consistent_point() -> None:
    n, d = 6, 5
    gen = torch.Generator().manual_seed(0)
    channel = make_channel("projection", {"m": 2, "sigma": 0.0})
    obs = channel.corrupt(torch.randn(n, d, generator=gen), sample_seeds(0, torch.arange(n), 0))
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    got = project_onto_observations(channel, obs, x)
    for i in range(n):
        a = obs["A"][i].double()
        want = x[i] - a.T @ torch.linalg.solve(a @ a.T, a @ x[i] - obs["y"][i].double())
        # CG on a 2x2 system is exact after 2 steps, up to float64 rounding on values below 10
        torch.testing.assert_close(got[i], want, rtol=0, atol=1e-10)


def test_a_noiseless_mask_projects_to_the_observed_entries() -> None:
    channel = make_channel("mask", {"rho": 0.5})
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    obs = channel.corrupt(x0, sample_seeds(0, torch.arange(4), 0))
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64) * 2 - 1
    got = project_onto_observations(channel, obs, x)
    m = obs["mask"].double()
    # A A^T is the mask itself: one CG step, then x - m (m x - y) in float64 (one rounding each)
    torch.testing.assert_close(got, m * obs["y"].double() + (1 - m) * x, rtol=0, atol=1e-15)


def test_a_noiseless_blur_projection_fits_the_observations() -> None:
    channel = make_channel("blur", {"sigma": 1.0})
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(3, 1, 8, 8, generator=gen) * 2 - 1
    obs = channel.corrupt(x0, sample_seeds(0, torch.arange(3), 0))
    x = x0 + 0.3 * torch.randn(x0.shape, generator=gen)
    got = project_onto_observations(channel, obs, x)
    before = (channel.A(obs, x) - obs["y"]).norm()
    after = (channel.A(obs, got) - obs["y"]).norm()
    assert after < 1e-3 * before  # float32 storage of y and of the result: ~1e-7 relative each


def test_em_train_projects_on_a_noiseless_blur_and_refuses_jpeg(tmp_path: Path, cli) -> None:
    run_ok("corrupt", "digits", tmp_path / "obs", "-c", "blur", "--limit", 16)
    settings = [*FAST, *TINY_UNET, *sets("sample.steps=2", "sample.project=on")]
    run_ok("em-train", tmp_path / "obs", tmp_path / "run", "--laps", 1, *settings)
    data = Observations(tmp_path / "obs")
    x = read_x(tmp_path / "run/recon/lap_001")
    residual = (data.channel.A(data.obs, x) - data.obs["y"]).flatten(1).norm(dim=1)
    assert residual.max() < 1e-3 * data.obs["y"].flatten(1).norm(dim=1).min()
    run_ok("corrupt", "digits", tmp_path / "jpeg", "-c", "jpeg", "--limit", 8)
    code, _, err = cli("em-train", tmp_path / "jpeg", tmp_path / "run2", "--laps", 1, *settings)
    assert code == 2 and "sample.project needs a linear channel" in error_line(err)
    assert not (tmp_path / "run2").exists()
