"""Noise2Self: the phase grid and the official neighbour average, the blind spot (the estimate at an
entry does not depend on that entry's observation: a Jacobian check), the masked loss's minimiser
on a Gaussian case against its closed form, refusals, the contract kit, and a CLI run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import FAST, TINY_UNET, error_line, read_x, run_ok, sets

from diffem_channels.mask import MaskChannel
from diffem_channels.noise import NoiseChannel
from diffem_cli.core.errors import DiffemError
from diffem_cli.diffusion.checkpoint import load_checkpoint
from diffem_cli.diffusion.nets import build_network
from diffem_cli.io.observations import load_recon
from diffem_cli.methods import default_config, get_method
from diffem_cli.methods.noise2self import (
    Noise2Self,
    Noise2SelfLoss,
    Noise2SelfOptions,
    masked_input,
    neighbour_average,
    phase_masks,
)
from diffem_cli.methods.testing import TINY_MLP, check_method, tiny_data
from diffem_cli.methods.testing import TINY_UNET as TINY_UNET_CONFIG

SIGMA = 0.2


def test_phases_partition_the_grid_and_leave_masked_pixels_unmasked_neighbours():
    masks = phase_masks((3, 7, 7), 3)
    assert masks.shape == (9, 3, 7, 7)
    assert torch.equal(masks.sum(0), torch.ones(3, 7, 7))  # every pixel masked by exactly one phase
    assert torch.equal(masks[:, 0], masks[:, 2])  # colour channels masked together
    assert masks[4, 0, 1, 1] == 1 and masks[4, 0, 4, 4] == 1 and masks[4, 0, 1, 2] == 0
    assert masks[1, 0, 1, 0] == 1  # phase 1: rows = 1 mod 3, columns = 0 mod 3 (official order)
    near = torch.nn.functional.conv2d(masks[:, :1], torch.ones(1, 1, 3, 3), padding=1) - masks[:, :1]
    assert float((near * masks[:, :1]).max()) == 0  # no masked pixel has a masked neighbour
    vectors = phase_masks((5,), 3)  # fewer coordinates than phases: leave one out
    assert torch.equal(vectors, torch.eye(5))
    assert phase_masks((20,), 3).shape == (9, 20) and torch.equal(
        phase_masks((20,), 3).sum(0), torch.ones(20)
    )


def test_neighbour_average_is_the_official_kernel_with_zero_padding():
    y = torch.arange(2 * 16, dtype=torch.float32).view(1, 2, 4, 4)
    avg = neighbour_average(y)
    for c in range(2):
        p = y[0, c]
        inner = (p[0, 0] + p[0, 2] + p[2, 0] + p[2, 2]) * 0.5 + p[0, 1] + p[1, 0] + p[1, 2] + p[2, 1]
        assert math.isclose(float(avg[0, c, 1, 1]), float(inner) / 6, rel_tol=1e-6)
        corner = p[0, 1] + p[1, 0] + 0.5 * p[1, 1]  # zeros beyond the border, still divided by 6
        assert math.isclose(float(avg[0, c, 0, 0]), float(corner) / 6, rel_tol=1e-6)
    mask = phase_masks((2, 4, 4), 3)[0].unsqueeze(0)
    zero = masked_input(y, mask, "zero")
    assert float((zero * mask).abs().max()) == 0 and torch.equal(zero * (1 - mask), y * (1 - mask))


@pytest.mark.parametrize("shape", [(1, 8, 8), (6,)])
def test_the_estimate_at_an_entry_does_not_depend_on_its_observation(shape):
    torch.manual_seed(0)
    net = build_network(TINY_MLP if len(shape) == 1 else TINY_UNET_CONFIG, shape, shape[0]).eval()
    y = torch.randn(1, *shape, requires_grad=True)
    out = Noise2Self().denoise(net, y)
    weights = torch.rand(out.shape, generator=torch.Generator().manual_seed(1)) + 0.5
    for mask in phase_masks(shape, 3).unsqueeze(1) > 0:
        # the gradient of a positive mix of the estimates on one phase's entries J
        (grad,) = torch.autograd.grad((out * weights)[mask].sum(), y, retain_graph=True)
        assert float(grad[mask].abs().max()) == 0.0  # exactly: no path from y_J to the estimate on J
        assert float(grad[~mask].abs().max()) > 1e-4  # ...but it reads the other entries
    single = Noise2Self({"noise2self": Noise2SelfOptions(infer="single-pass")})
    at = (0, 0, 3, 4) if len(shape) == 3 else (0, 2)
    (grad,) = torch.autograd.grad(single.denoise(net, y)[at], y)
    assert abs(float(grad[at])) > 1e-4  # the single pass is not J-invariant


class _MeanOfUnmasked(torch.nn.Module):
    """The J-invariant linear family ``f = a * mean of the unmasked inputs``; the mask is its ``cond``."""

    def __init__(self, a: float):
        super().__init__()
        self.a = a

    def forward(self, inp, t, cond):
        keep = 1 - cond
        mean = (inp * keep).flatten(1).sum(1) / keep.flatten(1).sum(1)
        return self.a * mean.view(-1, 1, 1, 1).expand_as(inp)


def test_masked_loss_is_minimised_at_the_blind_spot_shrinkage_near_the_mmse_one():
    # x = c * ones(9 x 9), c ~ N(0, s^2); y = x + sigma n. Over f_j = a * mean(y on the m = 72
    # pixels a phase leaves), the masked loss E(a u - y_j)^2 = a^2 Var(u) - 2 a s^2 + s^2 + sigma^2,
    # u = c + N(0, sigma^2 / m), is least at a* = m s^2 / (m s^2 + sigma^2), the MMSE shrinkage
    # of y_j given the other pixels; the MMSE shrinkage of the mean of all n = 81 pixels,
    # n s^2 / (n s^2 + sigma^2), differs from it only by the 9 pixels the phase hides.
    s, sigma, rows, n, m = 0.2, 1.0, 40_000, 81, 72
    g = torch.Generator().manual_seed(0)
    c = s * torch.randn(rows, 1, 1, 1, generator=g)
    y = c.expand(rows, 1, 9, 9) + sigma * torch.randn(rows, 1, 9, 9, generator=g)
    loss = Noise2SelfLoss((1, 9, 9), 3, "interpolate")
    values = [
        float(loss(_MeanOfUnmasked(a), {"y": y}, None, torch.Generator().manual_seed(1))) for a in (0, 1, 2)
    ]
    # the loss is a quadratic A a^2 - 2 B a + C in a over the same draws: three values fix it
    quad = (values[2] - 2 * values[1] + values[0]) / 2
    lin = (values[0] - values[1] + quad) / 2
    a_hat = lin / quad
    var_u = s * s + sigma * sigma / m
    a_star = s * s / var_u
    a_mmse = n * s * s / (n * s * s + sigma * sigma)
    # a_hat = sum(u ybar_J) / sum(u^2) per row (ybar_J: mean of the 9 masked pixels); u and the
    # residual r = ybar_J - a* u are independent Gaussians, so its standard error is
    # sqrt(Var(r) / (rows Var(u))), Var(r) = s^2 + sigma^2 / 9 - s^4 / Var(u)
    var_r = s * s + sigma * sigma / 9 - s**4 / var_u
    se = math.sqrt(var_r / (rows * var_u))
    assert abs(a_hat - a_star) < 4 * se, (a_hat, a_star, se)
    assert abs(a_star - a_mmse) < 0.03 and a_star < 0.8  # a real shrinkage, near the MMSE one


def test_refuses_other_channels_and_bad_options():
    method = get_method("noise2self", default_config())
    data, _ = tiny_data(MaskChannel(rho=0.5), (1, 8, 8))
    with pytest.raises(DiffemError, match=r"'noise2self' needs .*gaussian_denoising.*'mask' does not"):
        method.check(data)
    with pytest.raises(DiffemError, match="noise2self.width"):
        Noise2SelfOptions(width=1).validate()
    with pytest.raises(DiffemError, match="noise2self.infer"):
        Noise2SelfOptions(infer="average").validate()


@pytest.mark.parametrize("infer", ["j-invariant", "single-pass"])
def test_keeps_the_method_contract_on_images(infer):
    method = Noise2Self({"noise2self": Noise2SelfOptions(infer=infer)})
    check_method(method, NoiseChannel(sigma=SIGMA), (1, 8, 8), refuse=[MaskChannel(rho=0.5)])


@pytest.fixture(scope="module")
def d(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("n2s")
    run_ok(
        "corrupt", "digits", root / "obs", "-c", "noise", "-p", f"sigma={SIGMA}", "--limit", 32,
        "--clean-out", root / "clean",
    )  # fmt: skip
    run_ok(
        "em-train", root / "obs", root / "run", "--laps", 2, "--method", "noise2self", *FAST, *TINY_UNET,
        "--eval-clean", root / "clean",
    )  # fmt: skip
    return root


def test_cli_run_laps_reconstruct_and_uncond(d, cli, tmp_path):
    records = [json.loads(line) for line in (d / "run/metrics.jsonl").read_text().splitlines()]
    laps = [r for r in records if r["event"] == "lap"]
    assert [r["lap"] for r in laps] == [0, 1, 2] and all("eval_psnr" in r for r in laps)
    assert all(r["estep_forwards"] == 32 * 9 for r in laps[1:])  # one pass per phase
    ckpt_path = d / "run/checkpoints/lap_002.safetensors"
    ckpt = load_checkpoint(ckpt_path)
    assert ckpt.kind == "conditional" and ckpt.meta["method"] == "noise2self"
    assert ckpt.meta["method_config"]["noise2self"] == {
        "width": 3,
        "mode": "interpolate",
        "infer": "j-invariant",
    }
    first = load_checkpoint(d / "run/checkpoints/lap_001.safetensors").tensors
    assert any(not torch.equal(first[k], ckpt.tensors[k]) for k in first)  # lap 2 trained on
    code, _, err = cli("reconstruct", ckpt_path, d / "obs", tmp_path / "rec", "--steps", 3)
    assert code == 0, err
    lap_x, manifest = load_recon(d / "run/recon/lap_002")
    assert manifest["point_estimate"] == "noise2self j-invariant"
    # the reconstruction is the denoiser's output whatever the sampler's steps (DPM-Solver++ ends on it)
    assert torch.allclose(read_x(tmp_path / "rec"), lap_x, atol=1e-6)
    code, _, err = cli("sample", ckpt_path, tmp_path / "s", "-n", 2)
    assert code != 0 and "reconstruct" in error_line(err)
    run_ok("train-uncond", d / "run/recon/lap_002", tmp_path / "uncond", *FAST, *TINY_UNET)
    assert load_checkpoint(tmp_path / "uncond/checkpoints/uncond.safetensors").kind == "unconditional"


def test_cli_refuses_masks(cli, tmp_path):
    run_ok("corrupt", "digits", tmp_path / "m", "-c", "mask", "--limit", 8)
    code, _, err = cli(
        "em-train", tmp_path / "m", tmp_path / "r", "--laps", 1, "--method", "noise2self", *FAST,
        *sets("noise2self.infer=single-pass"),
    )  # fmt: skip
    assert code != 0 and "gaussian_denoising" in error_line(err)
