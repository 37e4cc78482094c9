"""SURE-Score: the SURE loss's mean against the true mean squared error on a Gaussian denoising case
with a closed form (a linear denoiser), the Monte-Carlo divergence probe on a non-linear one,
refusals, the contract kit, and CLI runs through em-train, reconstruct and compare."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import FAST, TINY_UNET, error_line, read_x, run_ok

from diffem_channels.blur import BlurChannel
from diffem_channels.mask import MaskChannel
from diffem_channels.noise import NoiseChannel
from diffem_cli.core.errors import DiffemError
from diffem_cli.diffusion.checkpoint import load_checkpoint
from diffem_cli.io.observations import load_recon
from diffem_cli.methods import default_config, get_method
from diffem_cli.methods.sure_score import SureLoss, SureOptions, SureScore
from diffem_cli.methods.testing import check_method, tiny_data

SIGMA = 0.2


class _Elementwise(torch.nn.Module):
    """A "network" applying ``fn`` to its input entry by entry (time and conditioning ignored)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, inp, t, cond):
        return self.fn(inp)


def _gaussian_case(rows: int, n: int, s: float, sigma: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = s * torch.randn(rows, n, generator=g)
    return x, x + sigma * torch.randn(rows, n, generator=g)


@pytest.mark.parametrize("a", [0.0, 0.5, 0.8, 1.0, 1.2])
def test_sure_of_a_linear_denoiser_is_its_true_mse(a):
    # x ~ N(0, s^2 I_n), y = x + sigma e, f(y) = a y: the true MSE per entry is
    # (a - 1)^2 s^2 + a^2 sigma^2, least at the MMSE shrinkage a = s^2 / (s^2 + sigma^2) = 0.8.
    # The probe is exact for a linear f (b^T (a (y + eps b) - a y) / eps = a ||b||^2), so a row's
    # estimate is ((a - 1)^2 ||y||^2 - n sigma^2 + 2 sigma^2 a ||b||^2) / n with ||y||^2 ~
    # (s^2 + sigma^2) chi2_n and ||b||^2 ~ chi2_n independent: its variance is
    # (2 (a - 1)^4 (s^2 + sigma^2)^2 + 8 sigma^4 a^2) / n, and the mean over the rows is within
    # 4 standard errors of the closed form but for a 6e-5 chance.
    s, sigma, rows, n = 1.0, 0.5, 20_000, 16
    _, y = _gaussian_case(rows, n, s, sigma)
    value = float(
        SureLoss(sigma)(_Elementwise(lambda v: a * v), {"y": y}, None, torch.Generator().manual_seed(1))
    )
    true_mse = (a - 1) ** 2 * s * s + a * a * sigma * sigma
    var = (2 * (a - 1) ** 4 * (s * s + sigma * sigma) ** 2 + 8 * sigma**4 * a * a) / n
    se = math.sqrt(var / rows)
    assert abs(value - true_mse) < 4 * se, (value, true_mse, se)


def test_sure_ranks_linear_denoisers_as_their_true_mse():
    # same case: true MSE 0.25 (a = 1, the identity), 0.2 (a = 0.8, MMSE), 0.3125 (a = 0.5); the
    # estimates share their draws, and each is within 4 standard errors (< 0.005, previous test)
    s, sigma = 1.0, 0.5
    _, y = _gaussian_case(20_000, 16, s, sigma)
    loss = SureLoss(sigma)
    value = {
        a: float(loss(_Elementwise(lambda v, a=a: a * v), {"y": y}, None, torch.Generator().manual_seed(1)))
        for a in (0.5, 0.8, 1.0)
    }
    assert value[0.8] < value[1.0] < value[0.5]


def test_the_divergence_probe_on_a_non_linear_denoiser():
    # f = tanh, entry by entry: Stein's identity holds for any smooth f, so E SURE equals the true
    # MSE up to the probe's finite-difference bias, E b (f(y + eps b) - f(y)) / eps - f'(y) =
    # eps^2 f'''(y) / 2 + O(eps^4) for Gaussian b (the eps term has odd moments); |tanh'''| <= 2,
    # so the SURE bias is at most 2 sigma^2 eps^2 per entry. Paired with the true error on the
    # same rows, the difference's standard error is measured from those rows.
    s, sigma, rows, n = 1.0, 0.5, 20_000, 16
    x, y = _gaussian_case(rows, n, s, sigma, seed=2)
    loss = SureLoss(sigma, eps=0.1)
    g = torch.Generator().manual_seed(3)
    b = torch.randn(y.shape, generator=g)
    f0, f1 = torch.tanh(y), torch.tanh(y + loss.eps * b)
    from diffem_cli.methods.sure_score import sure_terms

    per_row = sure_terms(f0, f1, y, b, sigma, loss.eps)
    value = float(loss(_Elementwise(torch.tanh), {"y": y}, None, torch.Generator().manual_seed(3)))
    assert math.isclose(value, float(per_row.mean()), rel_tol=1e-5)  # the loss draws b as above
    true = ((f0 - x) ** 2).mean(1)
    diff = per_row - true
    se = float(diff.std()) / math.sqrt(rows)
    bias = 2 * sigma**2 * loss.eps**2
    assert abs(float(diff.mean())) < 4 * se + bias, (float(diff.mean()), se, bias)


def test_probe_step_scales_with_the_noise_and_options_are_checked():
    assert math.isclose(SureLoss(0.3, eps=0.1).eps, 0.03)
    method = SureScore({"sure": SureOptions(eps=0.05)})
    data, _ = tiny_data(NoiseChannel(sigma=SIGMA), (4,))
    assert math.isclose(method.loss(data, default_config()).eps, 0.05 * SIGMA)
    for bad in (0, 1.5, float("nan")):
        with pytest.raises(DiffemError, match="sure.eps"):
            SureOptions(eps=bad).validate()


@pytest.mark.parametrize("channel", [MaskChannel(rho=0.5, sigma=0.1), BlurChannel()])
def test_refuses_channels_other_than_noise(channel):
    data, _ = tiny_data(channel, (1, 8, 8))
    with pytest.raises(DiffemError, match=r"'sure-score' needs a denoising channel.*gaussian_denoising"):
        get_method("sure-score", default_config()).check(data)


@pytest.mark.parametrize("shape", [(1, 8, 8), (5,)])
def test_keeps_the_method_contract(shape):
    check_method(SureScore(), NoiseChannel(sigma=SIGMA), shape, refuse=[MaskChannel(rho=0.5)])


@pytest.fixture(scope="module")
def d(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sure")
    run_ok(
        "corrupt", "digits", root / "obs", "-c", "noise", "-p", f"sigma={SIGMA}", "--limit", 32,
        "--clean-out", root / "clean",
    )  # fmt: skip
    return root


def test_cli_run_and_reconstruct(d, cli, tmp_path):
    run_ok(
        "em-train", d / "obs", tmp_path / "run", "--laps", 1, "--method", "sure-score", *FAST, *TINY_UNET,
        "--eval-clean", d / "clean",
    )  # fmt: skip
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    lap = [r for r in records if r["event"] == "lap"][-1]
    assert lap["lap"] == 1 and lap["estep_forwards"] == 32 and "eval_psnr" in lap  # one pass each
    ckpt_path = tmp_path / "run/checkpoints/lap_001.safetensors"
    ckpt = load_checkpoint(ckpt_path)
    assert ckpt.kind == "conditional" and ckpt.meta["method_config"] == {"sure": {"eps": 0.1}}
    code, _, err = cli("reconstruct", ckpt_path, d / "obs", tmp_path / "rec")
    assert code == 0, err
    lap_x, manifest = load_recon(tmp_path / "run/recon/lap_001")
    assert manifest["point_estimate"] == "sure-score"
    assert torch.allclose(read_x(tmp_path / "rec"), lap_x, atol=1e-6)


def test_compare_runs_both_denoisers_and_trains_their_generators(d, cli, tmp_path):
    code, _, err = cli(
        "compare", d / "obs", tmp_path / "cmp", "--methods", "noise2self,sure-score", "--laps", 1,
        "--eval-clean", d / "clean", *FAST, *TINY_UNET,
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads((tmp_path / "cmp/compare.json").read_text())
    for name in ("noise2self", "sure-score"):
        row = summary["methods"][name]
        assert math.isfinite(row["psnr"]) and math.isfinite(row["uncond_fd_pixels"])
        # the generator is a diffusion model trained on the denoised outputs (train-uncond)
        uncond = load_checkpoint(tmp_path / f"cmp/{name}/uncond/checkpoints/uncond.safetensors")
        assert uncond.kind == "unconditional"
        assert summary["accounting"][name]["uncond_examples"] > 0


def test_compare_refuses_them_on_masks(cli, tmp_path):
    run_ok("corrupt", "digits", tmp_path / "m", "-c", "mask", "--limit", 8, "--clean-out", tmp_path / "c")
    code, _, err = cli(
        "compare", tmp_path / "m", tmp_path / "cmp", "--methods", "sure-score",
        "--eval-clean", tmp_path / "c", *FAST,
    )  # fmt: skip
    assert code != 0 and "gaussian_denoising" in error_line(err)
