"""Metrics: Sinkhorn (against POT), sliced W2, PSNR/SSIM, Frechet distances, offline features."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffem_cli.core.errors import DiffemError
from diffem_cli.io.sources import sample_manifold
from diffem_cli.metrics import (
    fd_pixels,
    fd_rand,
    frechet_distance,
    frechet_from_moments,
    psnr,
    sinkhorn_cost,
    sinkhorn_divergence,
    sliced_wasserstein,
    ssim,
)
from diffem_cli.metrics.frechet import Moments, moments
from diffem_cli.metrics.sliced import projections


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- Sinkhorn ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "m", "shift", "reg", "max_iter"),
    [
        (64, 64, 0.0, 1e-3, 1024),  # the benchmark's settings: far from converged at 1,024 iterations
        (70, 50, 0.4, 1e-3, 1024),  # unequal sizes, mismatched clouds
        (40, 40, 1.0, 1e-3, 37),  # stops mid-way between two error checks
        (50, 30, 0.2, 0.5, 1024),  # large reg: converges, so POT's stopping rule ends it early
    ],
)
def test_sinkhorn_cost_matches_pot(n: int, m: int, shift: float, reg: float, max_iter: int) -> None:
    ot = pytest.importorskip("ot")
    x = sample_manifold(n, draw_seed=1).double() + shift * torch.randn(
        n, 5, generator=_gen(0), dtype=torch.float64
    )
    y = sample_manifold(m, draw_seed=2).double()
    expected = ot.sinkhorn2(
        [], [], ot.dist(x.numpy(), y.numpy()), reg, method="sinkhorn_log", numItermax=max_iter, warn=False
    )
    got = sinkhorn_cost(x, y, reg=reg, max_iter=max_iter)
    assert got == pytest.approx(float(expected), rel=1e-9)


def test_sinkhorn_cost_of_gaussian_clouds_matches_pot_in_3d() -> None:
    ot = pytest.importorskip("ot")
    x = torch.randn(80, 3, generator=_gen(1), dtype=torch.float64)
    y = 0.5 * torch.randn(60, 3, generator=_gen(2), dtype=torch.float64) + 1.0
    expected = ot.sinkhorn2(
        [], [], ot.dist(x.numpy(), y.numpy()), 1e-3, method="sinkhorn_log", numItermax=1024
    )
    assert sinkhorn_cost(x, y) == pytest.approx(float(expected), rel=1e-9)


def test_sinkhorn_cost_does_not_depend_on_the_thread_count() -> None:
    # the sparse products go through torch's CSR kernels (MKL's on x86), whose summation order may
    # follow the CPU and thread count: the bound is the one that holds between POT's dense sums and
    # ours, a different order over the same 1,024 iterations (test_sinkhorn_cost_matches_pot)
    x, y = sample_manifold(300, draw_seed=1).double(), sample_manifold(280, draw_seed=2).double() + 0.1
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = sinkhorn_cost(x, y)
        torch.set_num_threads(2)
        two = sinkhorn_cost(x, y)
    finally:
        torch.set_num_threads(threads)
    assert one == pytest.approx(two, rel=1e-9)


def test_sinkhorn_divergence_floor_and_monotone_in_shift() -> None:
    ref = sample_manifold(1024, draw_seed=3)
    sample = sample_manifold(512, draw_seed=4)
    scores = [sinkhorn_divergence(sample + s, ref, n_points=256) for s in (0.0, 0.2, 0.4, 0.8)]
    # a fresh sample of the same curve sits at the finite-sample noise level (~0.02 at 256 points)
    assert scores[0] < 0.05
    assert all(a < b for a, b in zip(scores, scores[1:], strict=False))
    assert scores[1] > 3 * scores[0]
    assert min(scores) >= 1e-6


def test_sinkhorn_divergence_of_the_reference_itself_is_the_floor() -> None:
    ref = sample_manifold(512, draw_seed=5)
    # the samples are exactly the subset the reference term uses as ref_A: cost equals the floor term
    assert sinkhorn_divergence(ref, ref, n_points=256) <= 1e-3


def test_sinkhorn_divergence_drops_points_outside_the_box() -> None:
    ref = sample_manifold(512, draw_seed=6)
    sample = sample_manifold(256, draw_seed=7) + 0.1
    clean_score = sinkhorn_divergence(sample, ref, n_points=128)
    outliers = torch.full((40, 5), 0.0)
    outliers[:, 2] = 3.5  # one coordinate outside (-3, 3) is enough
    noisy_sample = torch.cat([sample[:100], outliers, sample[100:]])
    noisy_ref = torch.cat([outliers * -2, ref])
    assert sinkhorn_divergence(noisy_sample, noisy_ref, n_points=128) == pytest.approx(clean_score, rel=1e-12)
    # a diverged sampler (nothing inside the box) scores inf instead of stopping a comparison
    assert sinkhorn_divergence(outliers, ref) == float("inf")


def test_sinkhorn_divergence_is_deterministic_and_caches_the_reference_term() -> None:
    from diffem_cli.metrics import sinkhorn as mod

    ref = sample_manifold(600, draw_seed=8)
    sample = sample_manifold(300, draw_seed=9) * 1.05
    first = sinkhorn_divergence(sample, ref, n_points=200, seed=3)
    calls = []
    original = mod.sinkhorn_cost
    mod.sinkhorn_cost = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        again = sinkhorn_divergence(sample, ref, n_points=200, seed=3)
    finally:
        mod.sinkhorn_cost = original
    assert again == first
    assert len(calls) == 1  # only samples vs ref_A; the ref_A vs ref_B term came from the cache


def test_sinkhorn_rejects_bad_input() -> None:
    with pytest.raises(DiffemError, match="dimension"):
        sinkhorn_divergence(torch.zeros(10, 3), torch.zeros(10, 5))
    with pytest.raises(DiffemError, match="NaN"):
        sinkhorn_cost(torch.full((4, 2), float("nan")), torch.zeros(4, 2))
    with pytest.raises(DiffemError, match="at least 2"):
        sinkhorn_divergence(torch.zeros(10, 2), torch.zeros(1, 2))


# --- sliced W2 ----------------------------------------------------------------------------------


def test_sliced_w2_zero_for_identical_and_closed_form_for_a_shift() -> None:
    x = torch.randn(200, 4, generator=_gen(3), dtype=torch.float64)
    assert sliced_wasserstein(x, x) == pytest.approx(0.0, abs=1e-12)
    shift = torch.tensor([0.3, -0.2, 0.1, 0.5], dtype=torch.float64)
    theta = projections(4, 256, seed=0)
    expected = float(((shift @ theta) ** 2).mean().sqrt())  # each projection moves by theta . shift
    assert sliced_wasserstein(x + shift, x) == pytest.approx(expected, rel=1e-9)
    values = [sliced_wasserstein(x + t * shift, x) for t in (0.5, 1.0, 2.0)]
    assert values[0] < values[1] < values[2]


def test_sliced_w2_matches_pot_for_unequal_sizes() -> None:
    ot = pytest.importorskip("ot")
    a = torch.randn(300, 5, generator=_gen(4))
    b = 1.3 * torch.randn(170, 5, generator=_gen(5)) + 0.2
    theta = projections(5, 64, seed=7)
    expected = ot.sliced_wasserstein_distance(
        a.double().numpy(), b.double().numpy(), projections=theta.numpy(), p=2
    )
    assert sliced_wasserstein(a, b, n_projections=64, seed=7) == pytest.approx(float(expected), rel=1e-9)


# --- PSNR / SSIM --------------------------------------------------------------------------------


def test_psnr_formula_and_kornia() -> None:
    kornia = pytest.importorskip("kornia")
    ref = torch.zeros(2, 1, 8, 8)
    x = ref.clone()
    x[0] += 0.5  # MSE 0.25 over a range of 2: 10 log10(4 / 0.25)
    x[1, :, :4] -= 0.1  # MSE 0.005
    expected = [10 * math.log10(4 / 0.25), 10 * math.log10(4 / 0.005)]
    assert psnr(x, ref, (-1, 1)) == pytest.approx(sum(expected) / 2, rel=1e-6)
    per_pair = [float(kornia.metrics.psnr(x[i : i + 1], ref[i : i + 1], 2.0)) for i in range(2)]
    assert per_pair == pytest.approx(expected, rel=1e-5)
    assert psnr(ref, ref) == pytest.approx(100.0)  # identical images: capped, not infinite


def test_ssim_identical_is_one_and_drops_with_noise() -> None:
    x = torch.rand(4, 3, 16, 16, generator=_gen(6)) * 2 - 1
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-6)
    values = [
        ssim((x + s * torch.randn(x.shape, generator=_gen(7))).clamp(-1, 1), x) for s in (0.05, 0.2, 0.5)
    ]
    assert 1.0 > values[0] > values[1] > values[2]


def test_ssim_window_fits_tiny_images() -> None:
    from diffem_cli.metrics.images import ssim_window

    assert ssim_window(8, 8) == 3
    assert ssim_window(32, 32) == 11
    with pytest.raises(DiffemError, match="shapes differ"):
        ssim(torch.zeros(2, 1, 8, 8), torch.zeros(3, 1, 8, 8))


# --- Frechet distance ---------------------------------------------------------------------------


def _exact(n: int, mean: torch.Tensor, cov: torch.Tensor, seed: int) -> torch.Tensor:
    """``n`` samples whose sample mean and (unbiased) covariance are exactly ``mean`` and ``cov``."""
    z = torch.randn(n, len(mean), generator=_gen(seed), dtype=torch.float64)
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(z.T @ z / (n - 1))).T
    return mean + z @ torch.linalg.cholesky(cov).T


def test_frechet_matches_closed_form_for_gaussians() -> None:
    scipy_linalg = pytest.importorskip("scipy.linalg")
    d = 4
    a = torch.randn(d, d, generator=_gen(8), dtype=torch.float64)
    b = torch.randn(d, d, generator=_gen(9), dtype=torch.float64)
    cov_a, cov_b = a @ a.T + 0.1 * torch.eye(d), b @ b.T + 0.1 * torch.eye(d)
    mu_a, mu_b = torch.zeros(d, dtype=torch.float64), torch.arange(d, dtype=torch.float64) / 3
    root = scipy_linalg.sqrtm(cov_a.numpy() @ cov_b.numpy()).real
    expected = float(((mu_a - mu_b) ** 2).sum() + torch.trace(cov_a + cov_b) - 2 * np.trace(root))
    assert frechet_from_moments(mu_a, cov_a, mu_b, cov_b) == pytest.approx(expected, rel=1e-9)
    fa, fb = _exact(50, mu_a, cov_a, 10), _exact(70, mu_b, cov_b, 11)
    assert frechet_distance(fa, fb) == pytest.approx(expected, rel=1e-9)
    # diagonal covariances: |mu_a - mu_b|^2 + sum (sqrt(a_i) - sqrt(b_i))^2
    va, vb = torch.tensor([1.0, 4.0, 9.0, 0.25]), torch.tensor([4.0, 1.0, 9.0, 1.0])
    diag = float(((mu_a - mu_b) ** 2).sum() + ((va.sqrt() - vb.sqrt()) ** 2).sum())
    assert frechet_from_moments(mu_a, torch.diag(va), mu_b, torch.diag(vb)) == pytest.approx(diag, rel=1e-12)
    assert frechet_distance(fa, fa) == pytest.approx(0.0, abs=1e-9)


def test_moments_accumulate_in_chunks() -> None:
    f = torch.randn(300, 6, generator=_gen(12), dtype=torch.float64) * 3 + 100.0  # a large common offset
    acc = Moments()
    for s in range(0, 300, 64):
        acc.add(f[s : s + 64])
    mu, cov = acc.result()
    mu_ref, cov_ref = moments(f)
    assert torch.allclose(mu, mu_ref, atol=1e-10) and torch.allclose(cov, cov_ref, atol=1e-9)


# --- offline image features ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    datasets = pytest.importorskip("sklearn.datasets")
    return torch.tensor(datasets.load_digits().images, dtype=torch.float32)[:, None] / 8.0 - 1.0


def test_fd_rand_and_fd_pixels_grow_with_noise(digits: torch.Tensor) -> None:
    ref, sample = digits[:800], digits[800:1600]
    noise = torch.randn(sample.shape, generator=_gen(13))
    rand_values, pixel_values = [], []
    for sigma in (0.0, 0.2, 0.5):
        noisy = (sample + sigma * noise).clamp(-1, 1)
        rand_values.append(fd_rand(noisy, ref))
        pixel_values.append(fd_pixels(noisy, ref))
    assert rand_values[0] < rand_values[1] < rand_values[2]
    assert pixel_values[0] < pixel_values[1] < pixel_values[2]
    assert fd_rand(sample, ref) == rand_values[0]  # deterministic: the same random network every call


def test_fd_rand_takes_colour_and_rejects_mismatched_shapes() -> None:
    x = torch.rand(64, 3, 16, 16, generator=_gen(14)) * 2 - 1
    assert fd_rand(x, x) == pytest.approx(0.0, abs=1e-6)
    assert fd_rand(x * 0.5, x) > 0.0
    with pytest.raises(DiffemError, match="images"):
        fd_rand(x, torch.rand(64, 3, 8, 8))
    with pytest.raises(DiffemError, match="C = 1 or 3"):
        fd_pixels(torch.rand(10, 2, 8, 8), torch.rand(10, 2, 8, 8))


# --- opt-in online metrics ----------------------------------------------------------------------


def test_online_metrics_are_off_without_local_weights(monkeypatch, tmp_path) -> None:
    from diffem_cli.metrics import online

    x = torch.rand(4, 3, 8, 8) * 2 - 1
    monkeypatch.delenv(online.INCEPTION_ENV, raising=False)
    monkeypatch.delenv(online.DINOV2_ENV, raising=False)
    for metric, call in (("fid", online.fid), ("kid", online.kid), ("fd_dinov2", online.fd_dinov2)):
        with pytest.raises(DiffemError, match=f"metric '{metric}' is off: diffem never downloads") as err:
            call(x, x)
        assert "\n" not in str(err.value) and "DIFFEM_" in str(err.value)
    with pytest.raises(DiffemError, match="metric 'is' is off"):
        online.inception_score(x)
    monkeypatch.setenv(online.INCEPTION_ENV, str(tmp_path / "missing.pth"))
    with pytest.raises(DiffemError, match="missing.pth does not exist"):
        online.fid(x, x)
    # a path given to the call wins over the variable
    with pytest.raises(DiffemError, match="weights .*given.pth does not exist"):
        online.kid(x, x, weights=tmp_path / "given.pth")


def test_evaluate_names_the_variable_that_enables_fid(cli, tmp_path, monkeypatch) -> None:
    from helpers import error_line, run_ok

    monkeypatch.delenv("DIFFEM_INCEPTION_WEIGHTS", raising=False)
    run_ok(
        "corrupt", "digits", tmp_path / "obs", "-c", "mask", "--limit", 8, "--clean-out", tmp_path / "clean"
    )
    code, _, err = cli("evaluate", tmp_path / "clean", "--reference", tmp_path / "clean", "--metrics", "kid")
    assert code == 2 and "DIFFEM_INCEPTION_WEIGHTS" in error_line(err)
    code, _, err = cli(
        "evaluate",
        tmp_path / "clean",
        "--reference",
        tmp_path / "clean",
        "--metrics",
        "fid",
        "--inception-weights",
        tmp_path / "nowhere.pth",
    )
    assert code == 2 and "nowhere.pth does not exist" in error_line(err)
