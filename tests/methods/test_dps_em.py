"""DPS-EM: the DPS step against its closed form, the channel's differentiable forward model, the
reset schedule, the weight rules (on residuals known in closed form), and runs through the CLI
(mask, jpeg, a clean warm start)."""

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
from diffem_channels.noise import NoiseChannel
from diffem_channels.projection import ProjectionChannel
from diffem_cli.core.errors import DiffemError
from diffem_cli.diffusion.checkpoint import build_model, load_checkpoint
from diffem_cli.diffusion.denoise import alpha_sigma
from diffem_cli.io.observations import load_recon
from diffem_cli.io.store import read_manifest
from diffem_cli.methods import default_config, get_method
from diffem_cli.methods.dps_em import DPSOptions, dps_posterior, pick_weight, subset_rows
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


def test_pick_weight_by_each_rule():
    # Noisy channel, residual c / weight on every row (c = 2): the root-mean-square residuals of the
    # grid are 2, 1, 0.5, 0.25, 0.125; the discrepancy principle takes the one nearest the noise
    # level 0.3, i.e. 0.25 (weight 8; the closed form c / s = 6.7 lies between 4 and 8, nearer 8 in
    # residual), and the smallest-residual rule the largest weight.
    rows = torch.ones(50, dtype=torch.float64)
    residuals = {w: 2.0 / w * rows for w in (1.0, 2.0, 4.0, 8.0, 16.0)}
    assert pick_weight(residuals, 0.3, "discrepancy") == 8.0
    assert pick_weight(residuals, 0.3, "smallest") == 16.0
    # Noiseless: weight 8 diverges (left out although its finite rows are the smallest). 4's rows
    # are 0.5 +- 0.1, mean square 0.5^2 + 0.1^2 = 0.26, the least; 2's is 0.261, within one
    # standard error of 0.26 (4's squares are 0.36 and 0.16: sd 0.1, over 50 rows 0.014), so the
    # discrepancy rule keeps the weaker weight 2 and the smallest rule (least mean, 0.5 < 0.51) 4.
    wobble = 0.1 * torch.tensor([1.0, -1.0] * 25, dtype=torch.float64)
    noiseless = {
        1.0: rows.clone(),
        2.0: (0.25 + 0.01 + 0.001) ** 0.5 * rows,
        4.0: 0.5 + wobble,
        8.0: torch.cat([torch.full((49,), 0.01, dtype=torch.float64), torch.tensor([float("nan")])]),
    }
    assert pick_weight(noiseless, 0.0, "discrepancy") == 2.0
    assert pick_weight(noiseless, 0.0, "smallest") == 4.0
    with pytest.raises(DiffemError, match="every dps.grid weight .* non-finite"):
        pick_weight({1.0: torch.tensor([float("inf")])}, 0.1, "discrepancy")


class _Observed:
    def __init__(self, channel, n):
        x = torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
        self.channel, self.obs = channel, channel.corrupt(x, sample_seeds(0, range(n)))

    def __len__(self):
        return len(self.obs["y"])


def _fake_draw(data, calls, diverge_above=None):
    """A sampler whose sample of row i under weight w is y_i + (1 / w) everywhere: its scaled
    residual ||A x - y|| / sqrt(m) is exactly 1 / w (observed entries move by 1 / w, m of them);
    weights above ``diverge_above`` give NaN."""

    def draw(make, rows, note):
        calls.append(rows)
        weight = make({k: v[rows] for k, v in data.obs.items()}).scale
        x = data.obs["y"][rows] + 1.0 / weight
        return x * float("nan") if diverge_above is not None and weight > diverge_above else x

    return draw


def test_the_discrepancy_rule_on_a_sampler_with_a_known_residual():
    model = torch.nn.Linear(1, 1)
    noisy = _Observed(NoiseChannel(sigma=0.2), 30)
    dps = DPSOptions(weight_rule="discrepancy", grid=[1.0, 2.0, 4.0, 8.0], subset=10)
    calls: list[torch.Tensor] = []
    make, record = dps_posterior(model, noisy, dps, 0).choose(_fake_draw(noisy, calls))
    # residuals 1, 0.5, 0.25, 0.125 against the noise level 0.2: 0.25 is nearest, weight 4
    assert record["dps_scale"] == 4.0 and record["dps_rule"] == "discrepancy"
    assert record["dps_noise"] == pytest.approx(0.2)
    assert [r for _, r in record["dps_residuals"]] == pytest.approx([1.0, 0.5, 0.25, 0.125])
    assert make(noisy.obs).scale == 4.0
    # every weight samples the same 10 random rows, not the first ones, the same at every E-step
    assert all(torch.equal(c, calls[0]) for c in calls) and len(calls) == 4
    assert torch.equal(calls[0], subset_rows(30, 10, 0)) and not torch.equal(calls[0], torch.arange(10))
    assert len(set(calls[0].tolist())) == 10

    # noiseless mask: the residual falls with the weight, weight 8 diverges: 4 is the smallest finite
    pinned = _Observed(MaskChannel(rho=0.5), 30)
    _, record = dps_posterior(model, pinned, dps, 0).choose(_fake_draw(pinned, [], diverge_above=4.0))
    assert record["dps_scale"] == 4.0 and record["dps_noise"] == 0.0
    assert record["dps_residuals"][-1] == [8.0, None]
    # the older spelling: dps.adaptive is the smallest-residual rule
    legacy = DPSOptions(adaptive=True, grid=[1.0, 2.0, 4.0, 8.0], subset=10)
    assert legacy.rule() == "smallest"
    _, record = dps_posterior(model, noisy, legacy, 0).choose(_fake_draw(noisy, []))
    assert record["dps_scale"] == 8.0


def test_the_weight_rule_rows_follow_the_run_seed():
    """Another run seed, other rows; the same seed, the same rows, from the config or a checkpoint."""
    assert torch.equal(subset_rows(200, 16, 3), subset_rows(200, 16, 3))
    picks = {tuple(subset_rows(200, 16, seed).tolist()) for seed in range(4)}
    assert len(picks) == 4
    cfg = default_config()
    cfg.seed = 3
    cfg.dps.weight_rule, cfg.dps.grid, cfg.dps.subset = "discrepancy", [1.0, 2.0], 10
    method = get_method("dps-em", cfg)
    restored = type(method).from_record(json.loads(json.dumps(method.config_record(cfg))))
    noisy = _Observed(NoiseChannel(sigma=0.2), 30)
    for m in (method, restored):
        calls: list[torch.Tensor] = []
        m.posterior(torch.nn.Linear(1, 1), noisy, {}).choose(_fake_draw(noisy, calls))
        assert m.seed == 3 and torch.equal(calls[0], subset_rows(30, 10, 3))
    assert not torch.equal(subset_rows(30, 10, 3), subset_rows(30, 10, 0))


def test_weight_rule_is_validated():
    with pytest.raises(DiffemError, match="dps.weight_rule"):
        DPSOptions(weight_rule="closest").validate()
    with pytest.raises(DiffemError, match="dps.adaptive"):
        DPSOptions(weight_rule="discrepancy", adaptive=True).validate()
    DPSOptions(weight_rule="smallest", adaptive=True).validate()
    assert DPSOptions().rule() == "fixed"


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
    # the last lap's posterior quality: K = 8 samples of each of the 40 observations (n = 64 > 40)
    assert "post_coverage" not in laps[1]
    assert laps[2]["post_k"] == 8 and laps[2]["post_n"] == 40
    assert laps[2]["post_coverage_expected"] == pytest.approx(7 / 9)
    assert 0 <= laps[2]["post_coverage"] <= 1 and laps[2]["post_psnr_mean"] > 0
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
