import pytest
import torch

from diffem_cli.diffusion import SAMPLERS, ddpm_scheduler, sample, sampler_scheduler, training_loss
from diffem_cli.errors import DiffemError


class OracleV(torch.nn.Module):
    """The exact v-prediction for data concentrated on one point ``mu``: sampling must return ``mu``."""

    def __init__(self, mu: torch.Tensor):
        super().__init__()
        self.mu = mu
        self.sched = ddpm_scheduler()

    def forward(self, x, t, cond=None):
        ab = self.sched.alphas_cumprod[t.long()].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        eps = (x - ab.sqrt() * self.mu) / (1 - ab).sqrt()
        return ab.sqrt() * eps - (1 - ab).sqrt() * self.mu


@pytest.mark.parametrize("name", SAMPLERS)
def test_samplers_recover_a_point_mass(name):
    mu = torch.tensor([1.5, -0.5, 0.25])
    x = sample(OracleV(mu), (3,), 8, sampler=name, steps=20, generator=torch.Generator().manual_seed(0))
    assert x.shape == (8, 3)
    assert torch.allclose(x, mu.expand(8, 3), atol=2e-2)


def test_deterministic_samplers_repeat_with_seed():
    model = OracleV(torch.zeros(2))
    a = sample(model, (2,), 4, sampler="dpm++", steps=5, generator=torch.Generator().manual_seed(3))
    b = sample(model, (2,), 4, sampler="dpm++", steps=5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_steps_are_network_evaluations():
    calls = []

    class Counting(OracleV):
        def forward(self, x, t, cond=None):
            calls.append(int(t[0]))
            return super().forward(x, t, cond)

    sample(Counting(torch.zeros(2)), (2,), 2, steps=12)
    assert len(calls) == 12
    assert calls[0] == 999


def test_training_loss_is_zero_for_the_oracle():
    mu = torch.tensor([0.3, -1.0])
    sched = ddpm_scheduler()
    loss = training_loss(OracleV(mu), mu.expand(64, 2), None, sched, torch.Generator().manual_seed(0))
    assert loss.item() < 1e-8


def test_bad_sampler_and_steps():
    with pytest.raises(DiffemError, match="unknown sampler"):
        sampler_scheduler("euler-magic", 10)
    with pytest.raises(DiffemError, match="steps"):
        sampler_scheduler("ddim", 0)
