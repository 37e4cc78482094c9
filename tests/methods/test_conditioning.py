"""The Gaussian conditioning feature (``cond.gaussian_mean``): the closed-form posterior mean, its
round trip through a checkpoint into ``reconstruct``, and its refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import FAST, TINY_UNET, error_line, read_x, run_ok, sets

from diffem_channels import sample_seeds
from diffem_cli.core.errors import DiffemError
from diffem_cli.diffusion.checkpoint import load_checkpoint
from diffem_cli.gaussian.moments import fit_moments
from diffem_cli.gaussian.shrinkage import GRID, shrinkage_target, shrunk
from diffem_cli.io.observations import Observations
from diffem_cli.io.registry import make_channel
from diffem_cli.methods.conditioning import (
    AUX_PREFIX,
    SHRINKAGE_KEY,
    SIGMA_KEY,
    CondOptions,
    cond_size,
    condition,
    feature_prior,
    residual_sigma,
    shrinkage_amount,
    uses_gaussian,
    uses_residual,
)

SETTINGS = [*FAST, *TINY_UNET, *sets("sample.steps=2", "cond.gaussian_mean=on")]


def test_the_feature_is_the_closed_form_posterior_mean() -> None:
    d, n, s = 6, 5, 0.1
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    cov = q @ torch.diag(torch.linspace(0.5, 2.0, d, dtype=torch.float64)) @ q.T
    mu = torch.linspace(-0.5, 0.5, d, dtype=torch.float64)
    x = (mu + torch.randn(4096, d, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(cov).T).float()
    prior = fit_moments(x)  # d <= 128: the sample mean and covariance, full
    channel = make_channel("mask", {"rho": 0.5, "sigma": s})
    obs = channel.corrupt(x[:n], sample_seeds(1, torch.arange(n), 0))
    got = condition(channel, obs, (d,), prior)
    assert got.shape == (n, channel.cond_size((d,)) + d) == (n, cond_size(channel, (d,), True))
    assert torch.equal(got[:, : channel.cond_size((d,))], channel.condition(obs, (d,)))
    sig, m = prior.covariance(), prior.mean
    for i in range(n):
        o = obs["mask"][i].bool()
        gain = sig[:, o] @ torch.linalg.inv(sig[o][:, o] + s * s * torch.eye(int(o.sum()), dtype=sig.dtype))
        want = m + gain @ (obs["y"][i][o].double() - m[o])
        # a float64 solve, eigenvalues in [0.5, 2]: its jitter (1e-8 of the mean variance) moves the
        # result by under 3e-8 relative; the float32 output rounds by 2^-24 relative, values < 8
        torch.testing.assert_close(got[i, -d:].double(), want, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cond")
    run_ok("corrupt", "digits", root / "obs", "-c", "mask", "-p", "rho=0.5", "--limit", 24)
    run_ok("em-train", root / "obs", root / "run", "--laps", 1, *SETTINGS)
    return root


def test_the_checkpoint_carries_the_gaussian_and_reconstruct_uses_it(trained: Path, tmp_path: Path) -> None:
    ckpt = load_checkpoint(trained / "run/checkpoints/lap_001.safetensors")
    data = Observations(trained / "obs")
    assert ckpt.meta["cond_size"] == data.channel.cond_size(data.shape) + data.shape[0]
    assert ckpt.meta["method_config"]["cond"] == {
        "gaussian_mean": "on",
        "residual": "auto",
        "residual_sigma_floor": 0.0,
        "gaussian_shrinkage": "auto",
    }
    assert ckpt.meta["residual"] is True
    prior = feature_prior(ckpt.aux)
    assert prior.dim == 64 and prior.full
    assert float(ckpt.aux[SHRINKAGE_KEY]) in GRID
    assert any(k.startswith(AUX_PREFIX) for k in ckpt.aux)
    run_ok("reconstruct", trained / "run/checkpoints/lap_001.safetensors", trained / "obs", tmp_path / "rec")
    x, exact = read_x(tmp_path / "rec"), data.channel.exact_entries(data.obs)
    assert torch.equal(x * exact, data.obs["y"] * exact)


def test_a_warm_start_with_other_conditioning_is_refused(trained: Path, cli, tmp_path: Path) -> None:
    warm = trained / "run/checkpoints/lap_001.safetensors"
    args = ["--laps", 1, *FAST, *TINY_UNET, "--warm-start", warm, *sets("cond.gaussian_mean=off")]
    code, _, err = cli("em-train", trained / "obs", tmp_path / "run", *args)
    assert code == 2 and "conditioning size" in error_line(err) and "cond." in error_line(err)
    assert not (tmp_path / "run").exists()


def test_a_channel_without_linear_form_is_refused(tmp_path: Path, cli) -> None:
    run_ok("corrupt", "digits", tmp_path / "obs", "-c", "jpeg", "--limit", 8)
    code, _, err = cli("em-train", tmp_path / "obs", tmp_path / "run", "--laps", 1, *SETTINGS)
    assert code == 2 and "cond.gaussian_mean=on needs a linear channel" in error_line(err)
    assert not (tmp_path / "run").exists()


def test_auto_takes_the_feature_for_images_through_a_linear_channel() -> None:
    mask, jpeg = make_channel("mask", {"rho": 0.5}), make_channel("jpeg", {})
    auto, on, off = CondOptions("auto"), CondOptions("on"), CondOptions("off")
    assert uses_gaussian(auto, mask, (1, 8, 8)) and not uses_gaussian(auto, jpeg, (1, 8, 8))
    assert not uses_gaussian(auto, mask, (5,)) and uses_gaussian(on, mask, (5,))
    assert not uses_gaussian(off, mask, (1, 8, 8))


def test_a_checkpoint_from_before_the_option_reads_as_off() -> None:
    from diffem_cli.methods.registry import method_for_checkpoint

    old = method_for_checkpoint({"method": "diffem", "method_config": {"em": {"recorrupt_every": 0}}})
    assert old.options["cond"].gaussian_mean == "off"
    assert old.options["cond"].residual == "off"
    assert old.options["cond"].gaussian_shrinkage == "off"
    before = method_for_checkpoint({"method": "oracle", "method_config": {"cond": {"gaussian_mean": "auto"}}})
    assert before.options["cond"].gaussian_mean == "auto" and before.options["cond"].residual == "off"
    new = {"gaussian_mean": "auto", "residual": "auto"}
    assert (
        method_for_checkpoint({"method": "diffem", "method_config": {"cond": new}}).options["cond"].residual
        == "auto"
    )


def test_the_residual_spread_is_the_weighted_rms_around_the_feature() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    cond = torch.tensor([[9.0, 9.0, 1.0, 2.0, 3.0, 6.0]])  # the channel's part, then the feature
    assert residual_sigma(x, cond) == pytest.approx(1.0)  # sqrt((0 + 0 + 0 + 4) / 4)
    weight = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    assert residual_sigma(x, cond, weight) == pytest.approx(2**0.5)  # sqrt((0 + 4) / 2)
    assert residual_sigma(x, torch.cat([cond[:, :2], x], dim=1)) == 1e-3  # floored, never 0
    assert residual_sigma(x, cond, floor=0.5) == pytest.approx(1.0)  # above the floor: measured
    assert residual_sigma(x, cond, floor=3.0) == 3.0  # below it: the floor
    with pytest.raises(DiffemError, match="cond.residual_sigma_floor"):
        CondOptions("auto", "on", -0.1).validate()


def test_the_shrinkage_setting_is_auto_off_or_an_amount() -> None:
    assert shrinkage_amount("auto") is None
    assert shrinkage_amount("off") == 0.0
    assert shrinkage_amount("0.3") == 0.3 and shrinkage_amount("1") == 1.0
    for wrong in ("1.5", "-0.1", "nan", "stationary"):
        with pytest.raises(DiffemError, match="cond.gaussian_shrinkage"):
            CondOptions(gaussian_shrinkage=wrong).validate()


def test_the_mstep_fits_the_feature_with_the_asked_shrinkage(trained: Path) -> None:
    from diffem_cli.io.observations import load_recon
    from diffem_cli.methods import default_config, get_method

    data = Observations(trained / "obs")
    x, _ = load_recon(trained / "run/recon/lap_000")
    cfg = default_config()
    cfg.options["cond"] = CondOptions("on", gaussian_shrinkage="0.4")
    step = get_method("diffem", cfg).mstep(data, x, 1, 1, None, cfg)
    cov = torch.cov(x.reshape(len(x), -1).double().T)
    want = shrunk(cov, shrinkage_target(cov, data.shape), 0.4)
    torch.testing.assert_close(feature_prior(step.aux).covariance(), want)
    assert float(step.aux[SHRINKAGE_KEY]) == 0.4


def test_the_residual_needs_the_feature() -> None:
    with pytest.raises(DiffemError, match="cond.residual=on needs the Gaussian feature"):
        CondOptions("off", "on").validate()
    mask = make_channel("mask", {"rho": 0.5})
    assert uses_residual(CondOptions("auto", "on"), mask, (1, 8, 8))
    assert not uses_residual(CondOptions("auto", "off"), mask, (1, 8, 8))
    with pytest.raises(DiffemError, match="cond.gaussian_mean=auto leaves off"):
        uses_residual(CondOptions("auto", "on"), mask, (5,))
    # auto follows the feature, never refuses
    assert uses_residual(CondOptions("auto", "auto"), mask, (1, 8, 8))
    assert not uses_residual(CondOptions("auto", "auto"), mask, (5,))
    CondOptions("off", "auto").validate()
    assert not uses_residual(CondOptions("off", "auto"), mask, (1, 8, 8))


@pytest.fixture(scope="module")
def residual_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("residual")
    run_ok("corrupt", "digits", root / "obs", "-c", "mask", "-p", "rho=0.5", "--limit", 24)
    run_ok("em-train", root / "obs", root / "run", "--laps", 1, *SETTINGS, *sets("cond.residual=on"))
    return root


def test_a_residual_checkpoint_carries_its_spread_into_reconstruct(
    residual_run: Path, tmp_path: Path
) -> None:
    ckpt = load_checkpoint(residual_run / "run/checkpoints/lap_001.safetensors")
    assert ckpt.meta["residual"] is True and ckpt.meta["method_config"]["cond"]["residual"] == "on"
    assert 0 < float(ckpt.aux[SIGMA_KEY]) < 2  # data in [-1, 1]: a spread around the feature
    run_ok(
        "reconstruct",
        residual_run / "run/checkpoints/lap_001.safetensors",
        residual_run / "obs",
        tmp_path / "rec",
    )
    data = Observations(residual_run / "obs")
    x, exact = read_x(tmp_path / "rec"), data.channel.exact_entries(data.obs)
    assert torch.isfinite(x).all() and torch.equal(x * exact, data.obs["y"] * exact)


def test_a_warm_start_across_the_residual_setting_is_refused(residual_run: Path, cli, tmp_path: Path) -> None:
    warm = residual_run / "run/checkpoints/lap_001.safetensors"
    args = ["--laps", 1, *SETTINGS, "--warm-start", warm, *sets("cond.residual=off")]
    code, _, err = cli("em-train", residual_run / "obs", tmp_path / "run", *args)
    assert code == 2 and "trained with cond.residual" in error_line(err)
    assert not (tmp_path / "run").exists()
