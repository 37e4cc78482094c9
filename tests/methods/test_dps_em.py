"""DPS-EM: the DPS step against its closed form, the channel's differentiable forward model, the
reset schedule, the adaptive weight, and runs through the CLI (mask, jpeg, a clean warm start)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import FAST, TINY_UNET, error_line, read_x, run_ok, sets
from test_guidance import D, GaussianDenoiser, _prior

from diffem_channels import Channel, sample_seeds
from diffem_channels.jpeg import JpegChannel
from diffem_channels.mask import MaskChannel
from diffem_channels.projection import ProjectionChannel
from diffem_cli.core.errors import DiffemError
from diffem_cli.diffusion.checkpoint import build_model, load_checkpoint
from diffem_cli.diffusion.denoise import alpha_sigma
from diffem_cli.io.observations import load_recon
from diffem_cli.io.store import read_manifest
from diffem_cli.methods import default_config, get_method
from diffem_cli.methods.guidance import ALPHA_MIN, DPSDenoiser, residual_norm


def test_dps_step_is_the_scaled_gradient_of_the_residual_norm():
    """For the Gaussian prior, x0(x_t) = mu + G (x_t - a mu), so the DPS output is
    x0 + zeta (s^2 / a) G^T A^T r / ||r|| with r = y - A x0, per sample."""
    mu, cov = _prior()
    channel = ProjectionChannel(m=2, sigma=0.1)
    x = mu.float() + torch.randn(5, D, generator=torch.Generator().manual_seed(1))
    obs = channel.corrupt(x, sample_seeds(0, range(5)))
    zeta = 0.7
    for t in (50, 400, 950):
        a, s = alpha_sigma(t)
        x_t = a * x + s * torch.randn(5, D, generator=torch.Generator().manual_seed(t))
        prior = GaussianDenoiser(mu, cov)
        got = DPSDenoiser(prior, channel, obs, zeta)(x_t, t).double()
        eye = torch.eye(D, dtype=torch.float64)
        gain = a * cov @ torch.linalg.inv(a * a * cov + s * s * eye)
        x0 = mu + (x_t.double() - a * mu) @ gain.T
        for i in range(5):
            A = obs["A"][i].double()
            r = obs["y"][i].double() - A @ x0[i]
            want = x0[i] + zeta * s * s / max(a, ALPHA_MIN) * gain.T @ A.T @ r / r.norm()
            # float32 Tweedie mean and one VJP: errors ~1e-6 relative, amplified by s^2/a <= 100
            assert torch.allclose(got[i], want, atol=1e-4 * (1 + s * s / a)), (t, i)


def test_dps_with_zero_scale_is_the_prior_and_has_no_graph():
    mu, cov = _prior()
    channel = ProjectionChannel(m=2, sigma=0.1)
    obs = channel.corrupt(mu.float().expand(3, D).contiguous(), sample_seeds(0, range(3)))
    x_t = torch.randn(3, D, generator=torch.Generator().manual_seed(3))
    prior = GaussianDenoiser(mu, cov)
    out = DPSDenoiser(prior, channel, obs, 0.0)(x_t, 300)
    assert not out.requires_grad
    assert torch.allclose(out, prior(x_t, 300), atol=1e-6)


def test_forward_model_of_the_channels():
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mask = MaskChannel(rho=0.5)
    obs = mask.corrupt(x, sample_seeds(0, range(2)))
    assert torch.equal(mask.forward(obs, x), obs["y"])  # linear: F = A
    jpeg = JpegChannel(quality=15)
    assert jpeg.differentiable and not jpeg.linear and jpeg.api_version == 2
    jobs = jpeg.corrupt(x, sample_seeds(0, range(2)))
    xg = (x * 0.9).requires_grad_(True)
    norm = residual_norm(jpeg, jobs, xg)
    assert torch.equal(jpeg.forward(jobs, x), jobs["y"])
    (g,) = torch.autograd.grad(norm.sum(), xg)
    assert torch.isfinite(g).all() and g.abs().sum() > 0  # kornia's codec passes gradients

    class Old(Channel):  # a version-1 plugin: no forward model, nothing masked
        name = "old"
        description = "a non-linear plugin written for interface version 1"

    old = Old()
    assert old.api_version == 1 and not old.differentiable and not old.masked_observation
    with pytest.raises(ValueError, match="no differentiable forward model"):
        old.forward({"y": x}, x)


class _Data:
    def __init__(self, channel):
        self.channel, self.obs = channel, {"y": torch.zeros(1, 1, 8, 8)}


def test_dps_em_refuses_a_channel_without_a_differentiable_forward_model():
    class Opaque(Channel):
        name = "opaque"
        description = "non-linear, not differentiable"

    m = get_method("dps-em", default_config())
    m.check(_Data(JpegChannel()))
    m.check(_Data(MaskChannel()))
    with pytest.raises(DiffemError, match="differentiable forward model.*'opaque' declares none"):
        m.check(_Data(Opaque()))


def test_reset_last_laps_start_from_fresh_weights():
    cfg = default_config()
    cfg.dps.reset_last = 2
    m = get_method("dps-em", cfg)
    prev = torch.zeros(4, 3)

    def fine_tunes(method, lap):
        return method.mstep(_Data(MaskChannel()), prev, lap, 5, None, cfg).fine_tune

    assert [fine_tunes(m, lap) for lap in range(1, 6)] == [True, True, True, False, False]
    cfg.dps.reset_last = 0
    assert all(fine_tunes(get_method("dps-em", cfg), lap) for lap in range(1, 6))


TRAIN = [*FAST, *TINY_UNET]


@pytest.fixture(scope="module")
def d(tmp_path_factory) -> Path:
    """Digits with mask 0.5 (and their clean images), JPEG digits, 50 clean digits' prior, and a
    2-lap adaptive DPS-EM run on the masked ones."""
    root = tmp_path_factory.mktemp("dps")
    mask = ["--channel", "mask", "-p", "rho=0.5"]
    run_ok("corrupt", "digits", root / "obs", *mask, "--limit", 40, "--clean-out", root / "clean")
    run_ok(
        "corrupt",
        "digits",
        root / "clean50",
        "--channel",
        "noise",
        "--limit",
        50,
        "--clean-out",
        root / "c50",
    )
    run_ok(
        "em-train",
        root / "obs",
        root / "run",
        "--laps",
        2,
        "--method",
        "dps-em",
        *TRAIN,
        *sets("dps.adaptive=true", "dps.subset=6", "dps.grid=[0.5, 4.0]", "dps.reset_last=1"),
        "--eval-clean",
        root / "clean",
    )
    return root


def _laps(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == "lap"]


def test_adaptive_run_records_the_weight_with_the_smallest_residual(d):
    laps = _laps(d / "run")
    assert [r["lap"] for r in laps] == [0, 1, 2]
    for lap in (1, 2):
        manifest = read_manifest(d / f"run/recon/lap_{lap:03d}")
        residuals = dict((v, r) for v, r in manifest["dps_residuals"])
        assert set(residuals) == {0.5, 4.0}
        assert manifest["dps_scale"] == min(residuals, key=residuals.get)
        assert laps[lap]["dps_scale"] == manifest["dps_scale"]
        assert "eval_psnr" in laps[lap]
    ckpt = load_checkpoint(d / "run/checkpoints/lap_002.safetensors")
    assert ckpt.kind == "unconditional" and ckpt.meta["method"] == "dps-em"
    assert ckpt.meta["method_config"]["dps"]["grid"] == [0.5, 4.0]
    build_model(ckpt)


def test_reconstruct_from_a_dps_checkpoint(d, cli, tmp_path):
    ckpt = d / "run/checkpoints/lap_002.safetensors"
    code, _, err = cli("reconstruct", ckpt, d / "obs", tmp_path / "rec", "--steps", 4)
    assert code == 0, err
    x, manifest = load_recon(tmp_path / "rec")
    assert manifest["method"] == "dps-em" and x.shape == (40, 1, 8, 8)
    assert torch.isfinite(x).all() and x.abs().max() <= 1


def test_warm_start_from_a_prior_of_50_clean_images(d, tmp_path):
    run_ok("train-uncond", d / "c50", tmp_path / "prior", *TRAIN)
    prior = tmp_path / "prior/checkpoints/uncond.safetensors"
    run_ok(
        "em-train",
        d / "obs",
        tmp_path / "run",
        "--laps",
        1,
        "--method",
        "dps-em",
        "--warm-start",
        prior,
        *TRAIN,
    )
    laps = _laps(tmp_path / "run")
    assert laps[0]["init"] == "warm-start"
    assert load_checkpoint(tmp_path / "run/checkpoints/lap_001.safetensors").meta["method"] == "dps-em"


def test_jpeg_observations_run_and_other_methods_are_refused(d, cli, tmp_path):
    run_ok("corrupt", "digits", tmp_path / "jpeg", "--channel", "jpeg", "-p", "quality=15", "--limit", 12)
    run_ok("em-train", tmp_path / "jpeg", tmp_path / "run", "--laps", 1, "--method", "dps-em", *TRAIN)
    x = read_x(tmp_path / "run/recon/lap_001")
    assert x.shape == (12, 1, 8, 8) and torch.isfinite(x).all()
    code, _, err = cli(
        "em-train", tmp_path / "jpeg", tmp_path / "r2", "--laps", 1, "--method", "em-mmps", *TRAIN
    )
    assert code != 0 and "linear" in error_line(err)
