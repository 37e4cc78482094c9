"""Ambient-Diffusion: the further mask (fixed per index, survival 1 - delta), the masks of the
sampler, the loss on the observed pixels only, the channel hook, refusals, and CLI runs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import FAST, TINY_UNET, error_line, read_x, run_ok

from diffem_channels import sample_seeds
from diffem_channels.box import BoxChannel
from diffem_channels.mask import MaskChannel
from diffem_channels.noise import NoiseChannel
from diffem_cli.core.errors import DiffemError
from diffem_cli.diffusion.checkpoint import build_model, load_checkpoint
from diffem_cli.diffusion.schedule import ddpm_scheduler
from diffem_cli.io.observations import load_recon
from diffem_cli.methods import default_config, get_method
from diffem_cli.methods.ambient import AmbientLoss, ambient_x0, further_mask, sampler_masks


def _se(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n)


def test_further_mask_is_fixed_per_index_and_keeps_with_prob_one_minus_delta():
    delta, shape = 0.3, (3, 8, 8)
    seeds = sample_seeds(0, range(2000))
    b = further_mask(shape, seeds, delta)
    assert b.shape == (2000, *shape)
    assert torch.equal(b[:, 0], b[:, 1]) and torch.equal(b[:, 0], b[:, 2])  # shared by colour
    n = 2000 * 64
    # 4 standard errors of a Bernoulli(0.7) mean over 128,000 draws
    assert abs(float(b[:, 0].mean()) - (1 - delta)) < 4 * _se(1 - delta, n)
    # neighbouring pixels independent: P(both kept) = 0.49
    both = float((b[:, 0, :, :-1] * b[:, 0, :, 1:]).mean())
    assert abs(both - (1 - delta) ** 2) < 4 * _se((1 - delta) ** 2, 2000 * 56)
    # the same index gives the same mask whatever the batch it sits in
    again = further_mask(shape, seeds[[5, 1999, 17]], delta)
    assert torch.equal(again, b[[5, 1999, 17]])


class _Data:
    def __init__(self, channel, x, index=None):
        self.channel, self.shape = channel, tuple(x.shape[1:])
        self.index = torch.arange(len(x)) if index is None else index
        self.obs = channel.corrupt(x, sample_seeds(0, self.index))
        self.kind, self.value_range = "image", [-1, 1]

    def __len__(self) -> int:
        return len(self.index)


def test_training_masks_hide_observed_pixels_only_and_do_not_depend_on_the_run_seed():
    x = torch.zeros(500, 1, 8, 8)
    data = _Data(MaskChannel(rho=0.5), x)
    cfg = default_config()
    cfg.ambient.delta = 0.2
    tensors = get_method("ambient", cfg).mstep(data, x, 1, 1, None, cfg).tensors
    a, m = tensors["mask"], tensors["further"]
    assert ((m == 1) <= (a == 1)).all()  # the further mask lies inside the observed pixels
    kept = float(m.sum() / a.sum())
    assert abs(kept - 0.8) < 4 * _se(0.8, int(a.sum()))
    cfg.seed = 7
    assert torch.equal(get_method("ambient", cfg).mstep(data, x, 2, 2, None, cfg).tensors["further"], m)


def test_sampler_masks_survive_with_one_minus_rho_times_one_minus_delta():
    seeds = sample_seeds(0, range(1000))
    m = sampler_masks(MaskChannel(rho=0.6), (1, 8, 8), seeds, 0.1)
    # (1 - 0.6)(1 - 0.1) = 0.36, 4 standard errors over 64,000 pixels
    assert abs(float(m.mean()) - 0.36) < 4 * _se(0.36, 64_000)
    box = sampler_masks(BoxChannel(), (3, 8, 8), seeds[:10], 0.1)
    assert box.shape == (10, 3, 8, 8) and set(box.unique().tolist()) <= {0.0, 1.0}


def test_observation_mask_hook():
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for channel in (MaskChannel(rho=0.5), BoxChannel(), MaskChannel(rho=0.5, per_channel=True)):
        assert channel.masked_observation and channel.api_version == 2
        obs = channel.corrupt(x, sample_seeds(0, range(4)))
        a = channel.observation_mask(obs)
        assert a.shape == x.shape and torch.equal(obs["y"], a * x)
    assert not NoiseChannel().masked_observation


def test_loss_is_blind_to_unobserved_pixels_and_zero_at_the_target():
    g = torch.Generator().manual_seed(0)
    y = torch.rand(64, 1, 4, 4, generator=g) * 2 - 1
    observed = (torch.rand(1, 1, 4, 4, generator=g) < 0.5).float().expand_as(y).contiguous()
    further = observed * (torch.rand(1, 1, 4, 4, generator=g) < 0.7).float()
    y = y * observed
    out = torch.zeros(1, 1, 4, 4, requires_grad=True)
    loss = AmbientLoss()
    value = loss(
        lambda x_in, t, m: out.expand_as(x_in),
        {"y": y, "mask": observed, "further": further},
        ddpm_scheduler(),
        torch.Generator().manual_seed(1),
    )
    value.backward()
    assert (out.grad[observed[:1] == 0] == 0).all() and (out.grad[observed[:1] == 1] != 0).any()
    # the output the loss aims at gives x0 = y on every observed pixel, seen or hidden
    a, s = 0.6, 0.8
    x_in = further * (a * y + s * torch.randn(y.shape, generator=g))
    target = further * (a * x_in - y) / s - (1 - further) * y
    assert torch.allclose(observed * ambient_x0(target, x_in, further, a, s), y, atol=1e-6)


def test_refusals():
    m = get_method("ambient", default_config())
    x = torch.zeros(2, 1, 8, 8)
    with pytest.raises(DiffemError, match="masked image.*'noise' is not one"):
        m.check(_Data(NoiseChannel(sigma=0.1), x))
    with pytest.raises(DiffemError, match="noiseless"):
        m.check(_Data(MaskChannel(rho=0.5, sigma=0.1), x))
    m.check(_Data(BoxChannel(), x))


@pytest.fixture(scope="module")
def d(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ambient")
    run_ok(
        "corrupt",
        "digits",
        root / "obs",
        "-c",
        "mask",
        "-p",
        "rho=0.5",
        "--limit",
        40,
        "--clean-out",
        root / "clean",
    )
    run_ok(
        "em-train",
        root / "obs",
        root / "run",
        "--laps",
        2,
        "--method",
        "ambient",
        *FAST,
        *TINY_UNET,
        "--eval-clean",
        root / "clean",
    )
    return root


def test_ambient_run_checkpoint_sample_and_reconstruct(d, cli, tmp_path):
    ckpt_path = d / "run/checkpoints/lap_002.safetensors"
    ckpt = load_checkpoint(ckpt_path)
    assert ckpt.kind == "ambient" and ckpt.meta["method"] == "ambient" and ckpt.meta["cond_size"] == 1
    amb = ckpt.meta["ambient"]
    assert amb["delta"] == 0.1
    # observed fraction of 40 x 64 pixels at rho = 0.5, times 0.9: within 4 standard errors
    assert abs(amb["survival"] - 0.45) < 4 * 0.9 * _se(0.5, 40 * 64)
    build_model(ckpt)
    code, _, err = cli("sample", ckpt_path, tmp_path / "s", "-n", 6, "--steps", 4)
    assert code == 0, err
    s = read_x(tmp_path / "s")
    assert s.shape == (6, 1, 8, 8) and torch.isfinite(s).all()
    code, _, err = cli("reconstruct", ckpt_path, d / "obs", tmp_path / "rec", "--steps", 4)
    assert code == 0, err
    x, manifest = load_recon(tmp_path / "rec")
    assert manifest["method"] == "ambient"
    from diffem_cli.io.observations import Observations

    obs = Observations(d / "obs")
    a = obs.obs["mask"].bool()
    assert torch.equal(x[a], obs.obs["y"][a])  # the observed pixels are kept exactly


def test_ambient_refuses_noisy_observations_through_the_cli(d, cli, tmp_path):
    run_ok("corrupt", "digits", tmp_path / "n", "-c", "noise", "--limit", 8)
    code, _, err = cli("em-train", tmp_path / "n", tmp_path / "r", "--laps", 1, "--method", "ambient", *FAST)
    assert code != 0 and "masked image" in error_line(err)
    code, _, err = cli(
        "reconstruct", d / "run/checkpoints/lap_001.safetensors", tmp_path / "n", tmp_path / "o"
    )
    assert code != 0 and "masked image" in error_line(err)
