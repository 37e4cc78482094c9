"""Training objectives and their timestep draws."""

import pytest
import torch
from helpers import OracleV

from diffem_cli.core.errors import DiffemError
from diffem_cli.diffusion.losses import VLoss, draw_timesteps
from diffem_cli.diffusion.schedule import ddpm_scheduler


def test_vloss_is_zero_for_the_oracle():
    mu = torch.tensor([0.3, -1.0])
    sched = ddpm_scheduler()
    loss = VLoss()(OracleV(mu), {"x": mu.expand(64, 2)}, sched, torch.Generator().manual_seed(0))
    # float32 rounding of v ~ O(1) terms: squared errors ~ (1e-6)^2
    assert loss.item() < 1e-8


def test_vloss_passes_the_conditioning():
    seen = {}

    class Spy(OracleV):
        def forward(self, x, t, cond=None):
            seen["cond"] = cond
            return super().forward(x, t, cond)

    cond = torch.randn(8, 4)
    VLoss()(Spy(torch.zeros(2)), {"x": torch.zeros(8, 2), "cond": cond}, ddpm_scheduler(), torch.Generator())
    assert seen["cond"] is cond


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
